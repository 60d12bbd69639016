"""Per-thread scratch buffers for CPU kernels: temporaries that live only inside one forward or one backward.

On CPU every fresh multi-megabyte tensor is page-faulted in (glibc maps large blocks afresh and returns freed
memory to the system), which on the machines we measured costs up to ~1 ms per MB, as much as the matmuls
around it. A temporary that is never saved for backward, never returned and never outlives the call can live
in a buffer that is reused instead. CUDA's caching allocator already reuses memory: there `get` returns None
and callers allocate as usual.
"""

from __future__ import annotations

import math
import threading

import torch


class Workspace(threading.local):
    """Per-thread scratch buffers, reused across calls, for tensors that live only inside one forward or one
    backward (never saved for backward, never returned). CPU only: CUDA's caching allocator already reuses
    memory. Buffers made under inference mode are kept apart (they cannot be written outside it)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """A scratch tensor of `shape` (dtype/device of `like`), or None off CPU (callers then allocate)."""
        if like.device.type != "cpu":
            return None
        key = (name, like.dtype, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel].view(shape)

    def empty(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """`get`, or a fresh tensor where there is no scratch (off CPU)."""
        buffer = self.get(name, shape, like)
        return torch.empty(shape, dtype=like.dtype, device=like.device) if buffer is None else buffer

    def clear(self) -> None:
        self.buffers.clear()


WORKSPACE = Workspace()
