"""The seam between the reference model and optional fast kernels.

A process-wide table of named callables. It is EMPTY where hf_moe is not installed (the model loaded as
remote code): every call site then runs the reference code next to it. `import hf_moe` fills it
(`hf_moe.kernels.register_kernels`). A call site looks its kernel up once per call::

    out = run_kernel("rms_norm", self, hidden_states)   # None: no kernel, or not eligible for these inputs
    if out is not None:
        return out
    ...reference math...

A kernel receives the module and the inputs and returns None when it is not eligible, so the one place that
decides is the kernel package (`hf_moe.kernels.eligible`), never the model. Names are free-form strings;
hf_moe registers "linear", "rms_norm", "rope", "swiglu", "mla_attention", "causal_lm_loss", "lm_head_loss",
and its save/publish helpers may add others (e.g. "model_card").

Remote-code copies of this file (`transformers_modules.<repo>.kernel_hooks`) share hf_moe's table when
hf_moe has been imported in the process (found in `sys.modules`, never imported from here), so a model
loaded with `trust_remote_code=True` next to an installed hf_moe runs the installed kernels.

`plain_linear` is the one test of whether code may read a Linear's weight directly instead of calling the
module: the absorbed MLA decode uses it here, every kernel through `hf_moe.kernels.eligible`.
"""

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _modules

_CANONICAL = "hf_moe.modeling.kernel_hooks"  # the installed package's copy of this module
_KERNELS: dict[str, Callable] = {}


def _table() -> dict[str, Callable]:
    """hf_moe's table when hf_moe is imported (also from a remote-code copy), else this copy's own."""
    canonical = sys.modules.get(_CANONICAL)
    return _KERNELS if canonical is None else canonical._KERNELS


def register_kernel(name: str, fn: Callable) -> None:
    """Register (or replace) the callable under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"kernel name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"kernel {name!r} must be callable, got {type(fn).__name__}")
    _table()[name] = fn


def unregister_kernel(name: str) -> Callable | None:
    """Remove `name` from the table; returns what was registered (None if nothing was)."""
    return _table().pop(name, None)


def get_kernel(name: str) -> Callable | None:
    """The callable registered under `name`, or None (then the caller runs its reference code)."""
    return _table().get(name)


def registered_kernels() -> tuple[str, ...]:
    """The names currently registered, sorted."""
    return tuple(sorted(_table()))


def run_kernel(name: str, *args: object, **kwargs: object) -> object | None:
    """The kernel `name` applied to the arguments, or None when none is registered or it declines them."""
    kernel = _table().get(name)
    return None if kernel is None else kernel(*args, **kwargs)


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a Linear layer: the "linear" kernel where it takes the call, else the module itself (so
    LoRA layers, hooks and quantized linears behave as they always do)."""
    out = run_kernel("linear", module, x)
    return module(x) if out is None else out


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
