"""When a hand-written kernel may stand in for module code: the conditions shared by every fast path.

A kernel that reads a Linear's weight directly skips whatever wraps or hooks the module (peft's LoRA layers,
quantized linears, forward hooks, accelerate's offload hooks, which replace `forward`), so it runs only on a
plain bias-free nn.Linear. Under autocast the modules' matmuls change dtype per op, which a Function with its
own backward would not follow: there the module path runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _modules


def plain_linear(module: nn.Module, allow_bias: bool = False) -> bool:
    """An nn.Linear (bias-free unless `allow_bias`) that nothing wraps or hooks: no forward or backward hooks of
    its own or global ones, no `forward` replaced on the instance (accelerate's hooks do that)."""
    return (type(module) is nn.Linear and (allow_bias or module.bias is None) and not module._forward_hooks
            and not module._forward_pre_hooks and not module._backward_hooks and not module._backward_pre_hooks
            and "forward" not in module.__dict__ and not hasattr(module, "_hf_hook") and not _global_module_hooks())


def _global_module_hooks() -> bool:
    """Hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook` and kin)."""
    return bool(_modules._global_forward_hooks or _modules._global_forward_pre_hooks
                or _modules._global_backward_hooks or _modules._global_backward_pre_hooks)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Autograd records an op on these tensors: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def autocast_active(tensor: torch.Tensor) -> bool:
    """Autocast is on for this tensor's device type."""
    return torch.is_autocast_enabled(tensor.device.type)
