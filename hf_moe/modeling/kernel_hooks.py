"""The seam between the reference model and optional fast kernels.

A process-wide table of named callables. It is EMPTY where hf_moe is not installed (the model loaded as
remote code): every call site then runs the reference code next to it. `import hf_moe` fills it
(`hf_moe.kernels.register_all`). A call site looks its kernel up once per call::

    kernel = get_kernel("rms_norm")
    if kernel is not None:
        out = kernel(self, hidden_states)   # returns None when the kernel is not eligible for these inputs
        if out is not None:
            return out
    return reference(...)

A kernel receives the module and the inputs and returns None when it is not eligible, so the one place
that decides is the kernel package (hf_moe.kernels.eligible), never the model. Names are free-form strings;
hf_moe uses "rms_norm", "rope", "swiglu", "linear", "lm_loss", "model_card".
"""

from collections.abc import Callable

_KERNELS: dict[str, Callable] = {}


def register_kernel(name: str, fn: Callable) -> None:
    """Register (or replace) the callable under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"kernel name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"kernel {name!r} must be callable, got {type(fn).__name__}")
    _KERNELS[name] = fn


def unregister_kernel(name: str) -> Callable | None:
    """Remove `name` from the table; returns what was registered (None if nothing was)."""
    return _KERNELS.pop(name, None)


def get_kernel(name: str) -> Callable | None:
    """The callable registered under `name`, or None (then the caller runs its reference code)."""
    return _KERNELS.get(name)


def registered_kernels() -> tuple[str, ...]:
    """The names currently registered, sorted."""
    return tuple(sorted(_KERNELS))
