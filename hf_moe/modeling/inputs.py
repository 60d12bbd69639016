"""What a caller hands the model's forward, checked at the entry in transformers' words (LlamaModel's "You must
specify exactly one of input_ids or inputs_embeds"), so that a wrong input is named instead of failing deep in
torch (an embedding's "index out of range in self", a reshape of 0 elements, a loss gathering out of bounds).

Shape and dtype checks cost nothing. The value checks (token ids in [0, vocab_size), labels in [0, vocab_size) or
the ignore index) are one min/max reduction each and run on CPU tensors only: on an accelerator reading the result
would synchronise the host with the device at every forward; there an out-of-range id still fails in the
embedding (a device-side assert on CUDA): rerun the batch on CPU to have it named. Nothing is checked while
torch.compile / torch.fx traces the forward.
"""

from __future__ import annotations

import torch

from .configuration import MoEConfig

IGNORE_INDEX = -100  # transformers' label ignore index (ForCausalLMLoss, DataCollatorForLanguageModeling)


def _checks_values(tensor: torch.Tensor) -> bool:
    """Value checks read a reduction on the host: CPU only, and never while torch.compile traces."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _integer_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}.")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (torch.long), got dtype {value.dtype}.")
    return value


def _first_outside(values: torch.Tensor, low: int, high: int, allowed: int | None = None) -> int | None:
    """The first value outside [low, high) (and not `allowed`), or None; one min/max reduction when all are inside."""
    if values.numel() == 0:
        return None
    smallest, largest = torch.aminmax(values)
    if smallest >= low and largest < high:
        return None
    bad = (values < low) | (values >= high)
    if allowed is not None:
        bad &= values != allowed
    return int(values[bad][0]) if bool(bad.any()) else None


def check_inputs(
    config: MoEConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError (TypeError for a non-tensor) naming what is wrong with the forward's inputs."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if any(isinstance(x, torch.fx.Proxy) for x in (input_ids, inputs_embeds, attention_mask, labels)):
        return  # symbolic tracing (torch.fx): no values, no concrete shapes
    if input_ids is not None:
        _integer_tensor("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
        shape = tuple(input_ids.shape)
    else:
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}.")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch_size, sequence_length, hidden_size="
                             f"{config.hidden_size}), got {tuple(inputs_embeds.shape)}.")
        shape = tuple(inputs_embeds.shape[:2])
    what = "input_ids" if input_ids is not None else "inputs_embeds"
    if shape[0] == 0:
        raise ValueError(f"{what} has shape {shape}: the batch is empty (batch_size 0).")
    if shape[1] == 0:
        raise ValueError(f"{what} has shape {shape}: the sequences are empty (sequence_length 0).")
    if input_ids is not None and _checks_values(input_ids):
        bad = _first_outside(input_ids, 0, config.vocab_size)
        if bad is not None:
            raise ValueError(f"input_ids holds the token id {bad}, outside the vocabulary: ids must be in "
                             f"[0, vocab_size={config.vocab_size}).")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and (
        attention_mask.shape[0] != shape[0] or attention_mask.shape[1] < shape[1]
    ):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, {what} {shape}: it must have "
                         f"shape (batch_size={shape[0]}, past + sequence_length >= {shape[1]}).")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is None:
            continue
        _integer_tensor(name, value)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the shape of {what} {shape} (batch_size, sequence_length), got "
                             f"{tuple(value.shape)}.")
        if _checks_values(value):
            bad = _first_outside(value, 0, config.vocab_size, allowed=IGNORE_INDEX)
            if bad is not None:
                raise ValueError(f"{name} holds {bad}: labels must be token ids in [0, vocab_size="
                                 f"{config.vocab_size}) or {IGNORE_INDEX} (ignored).")


__all__ = ["IGNORE_INDEX", "check_inputs"]
