"""The one rule deciding whether a hand-written kernel may stand in for the reference code.

Every fast path of hf_moe.kernels asks `eligible(...)` and runs only when it answers True:

- device: every tensor on a device where the kernels were measured faster (`FAST_DEVICES`: CPU today; on
  CUDA the reference code, or transformers' registered kernels, run until a GPU measurement says otherwise);
- dtype: every tensor in the kernel's dtypes (fp32 by default: that is what was measured);
- autocast: off for that device (autocast changes dtypes per op, which a Function with its own backward
  would not follow);
- grad: for kernels whose gain is their hand-written backward (`training=True`), autograd must record the
  call; `training=False` asks for the opposite, None accepts either;
- not traced: while torch.compile / torch.export traces, the compiler fuses the reference code itself, and these
  kernels' host-side decisions (and syncs) would break its graph; only a kernel that runs as one opaque op in a
  traced graph (the experts' `hf_moe::fused_experts`) passes `traceable=True`;
- plain modules: a kernel that reads a Linear's weight directly would skip whatever wraps or hooks the module
  (peft's LoRA layers, quantized linears, forward/backward hooks, global module hooks, accelerate's offload
  hooks that replace `forward`), so every module it reads must be a plain, unhooked nn.Linear.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..modeling.experts import tracing
from ..modeling.kernel_hooks import plain_linear

FAST_DEVICES = frozenset({"cpu"})  # device types where the kernels were measured faster than the reference
FP32 = (torch.float32,)


def eligible(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FP32, training: bool | None = None,
             modules: Iterable[nn.Module] = (), allow_bias: bool = False, traceable: bool = False) -> bool:
    """Whether a fast path may run on these tensors and modules (see the module docstring). `tensors` are the
    inputs and the weights the kernel reads; `modules` the Linear layers whose weights it reads directly."""
    if training and not torch.is_grad_enabled():  # the cheapest test first: decode steps end here
        return False
    if not traceable and tracing():
        return False
    device = tensors[0].device.type
    if device not in FAST_DEVICES or torch.is_autocast_enabled(device):
        return False
    if any(t.device.type != device or t.dtype not in dtypes for t in tensors):
        return False
    if training is not None and records_grad(*tensors) != training:
        return False
    return all(plain_linear(module, allow_bias) for module in modules)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Autograd records an op on these tensors: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
