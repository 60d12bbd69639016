"""The KV cache hf_moe models create by default: transformers' DynamicCache, with full-attention layers that
append in place.

transformers' `DynamicLayer.update` concatenates the whole cache with the new token at every decode step, so a
step copies (and, on CPU, page-faults in) the entire cache of every layer: at 8k context that was two thirds
of an absorbed MLA decode step. `GrowableLayer` keeps keys and values as views into buffers with spare
capacity (growing by half when full), so an append copies only the new tokens. Everything else is DynamicLayer's:
crop keeps a view, beam reordering / batch selection replace the tensors and the next append re-buffers them.
Appends while autograd records (a training forward with use_cache, a forward outside no_grad) fall back to
concatenation, since writing into a buffer that earlier outputs were computed from would invalidate their
backward; generate() runs without grad.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

SPARE_TOKENS = 256  # a buffer holds at least this many tokens more than it was made for...
GROWTH = 1.5  # ...and, once appends outgrow one, this factor more: amortised O(1) appends


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys/values (B, heads, length, dim) are prefixes of (B, heads, capacity, dim) buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():  # outputs computed from these cached tensors may be saved for backward
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        if not self.buffers_hold(key_states, value_states, length, total):
            self.rebuffer(key_states, value_states, length, total)
        self.key_buffer[..., length:total, :].copy_(key_states)
        self.value_buffer[..., length:total, :].copy_(value_states)
        self.keys, self.values = self.key_buffer[..., :total, :], self.value_buffer[..., :total, :]
        return self.keys, self.values

    def buffers_hold(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, total: int) -> bool:
        """The buffers exist, fit `total` tokens of these shapes/dtype, are writable in this mode and the cached
        prefix still lives in them (crop keeps it there; reorder/select replace it)."""
        buffers = (self.key_buffer, self.value_buffer)
        if any(b is None for b in buffers):
            return False
        for buffer, new, cached in zip(buffers, (key_states, value_states), (self.keys, self.values)):
            if (buffer.shape[-2] < total or buffer.shape[:-2] != new.shape[:-2] or buffer.shape[-1] != new.shape[-1]
                    or buffer.dtype != new.dtype or buffer.device != new.device
                    or (buffer.is_inference() and not torch.is_inference_mode_enabled())
                    or (length > 0 and cached.data_ptr() != buffer.data_ptr())):
                return False
        return True

    def rebuffer(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, total: int) -> None:
        """New buffers holding the cached prefix: `SPARE_TOKENS` spare for the first one (a prompt rarely grows by
        half), max(GROWTH * total, total + SPARE_TOKENS) once appends outgrow it."""
        growing = self.key_buffer is not None
        capacity = max(int(GROWTH * total), total + SPARE_TOKENS) if growing else total + SPARE_TOKENS
        buffers = []
        for new, cached in ((key_states, self.keys), (value_states, self.values)):
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            if length:
                buffer[..., :length, :].copy_(cached)
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None


def growable(layer: object) -> object:
    """A plain DynamicLayer as a GrowableLayer holding the same tokens; any other layer as it is."""
    if type(layer) is not DynamicLayer:
        return layer
    grown = GrowableLayer()
    if layer.get_seq_length():
        with torch.no_grad():
            grown.update(layer.keys, layer.values)
    return grown


def use_growable_layers(cache: DynamicCache) -> DynamicCache:
    """Make a DynamicCache's full-attention layers (present and lazily added ones) append in place."""
    cache.layers = [growable(layer) for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = GrowableLayer
    return cache


class MoECache(DynamicCache):
    """DynamicCache with `GrowableLayer` for every full-attention layer (sliding-window layers stay as they are)."""

    def __init__(self, config: PreTrainedConfig | None = None, **kwargs: object) -> None:
        super().__init__(config=config, **kwargs)
        use_growable_layers(self)
