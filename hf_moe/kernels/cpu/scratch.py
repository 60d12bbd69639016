"""Scratch memory for the CPU kernels: temporaries that live inside one forward or one backward.

On CPU every fresh multi-megabyte tensor is page-faulted in (glibc maps large blocks afresh and returns freed
memory to the system), which on the machines we measured costs up to ~1 ms per MB, as much as the matmuls
around it. `scratch(shape, like)` hands out memory that was faulted in before instead.

Safety by construction, not by statement order: a pooled buffer is handed out again only when NO tensor
references its memory any more (its storage's use count, checked at every request), so two live scratch
tensors never alias, whatever the caller does, and a tensor that escapes its call (saved for backward,
returned) simply keeps its buffer until it dies. Bounded: each thread pools at most `POOL_BYTES`
(`set_pool_bytes`); requests beyond that get ordinary tensors, and `release()` frees the pool. Off CPU
callers allocate as usual (CUDA's caching allocator already reuses memory).
"""

from __future__ import annotations

import math
import threading

import torch

POOL_BYTES = 256 * 2**20  # per thread
_MIN_POOLED_BYTES = 64 * 2**10  # smaller tensors are cheap to allocate: not worth pooling
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: never reuse (always correct, just slower)


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []  # flat base tensors

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


_pool = _Pool()


def _is_free(buffer: torch.Tensor) -> bool:
    """Nothing but the pool references this buffer's memory (the count includes the temporary storage
    object made to ask)."""
    return _use_count is not None and _use_count(buffer.untyped_storage()._cdata) <= 2


def scratch(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` with `like`'s dtype and device, from the pool on CPU (see the module
    docstring): never memory that another live tensor uses."""
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes < _MIN_POOLED_BYTES:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    inference = torch.is_inference_mode_enabled()  # inference tensors cannot be written outside inference mode
    best = None
    for buffer in _pool.buffers:
        if (buffer.dtype == like.dtype and buffer.is_inference() == inference and buffer.numel() >= numel
                and (best is None or buffer.numel() < best.numel()) and _is_free(buffer)):
            best = buffer
    if best is None:
        best = _new_buffer(numel, like.dtype, nbytes)
    return best[:numel].view(shape)


def _new_buffer(numel: int, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """A fresh buffer, pooled if the pool stays within its bound once the free buffers it must drop are gone."""
    buffer = torch.empty(numel, dtype=dtype)
    if _use_count is None or nbytes > POOL_BYTES:
        return buffer
    while _pool.bytes + nbytes > POOL_BYTES:
        free = [b for b in _pool.buffers if _is_free(b)]
        if not free:
            return buffer  # every pooled buffer is in use: this one stays unpooled
        _pool.buffers.remove(min(free, key=torch.Tensor.numel))  # the smallest first: big ones are costlier
    _pool.buffers.append(buffer)
    return buffer


def pooled_bytes() -> int:
    """Bytes this thread's pool holds."""
    return _pool.bytes


def release() -> None:
    """Drop this thread's pooled buffers (memory still in use is freed when its last tensor dies)."""
    _pool.buffers.clear()


def set_pool_bytes(limit: int) -> None:
    """Bound every thread's pool to `limit` bytes (0 disables pooling); this thread's pool shrinks now."""
    global POOL_BYTES
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"set_pool_bytes(limit={limit!r}): limit must be a non-negative int of bytes")
    POOL_BYTES = limit
    if _pool.bytes > limit:
        release()
