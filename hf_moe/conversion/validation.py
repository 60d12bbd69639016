"""Checks on the values a conversion reads and on what it reports about them.

- Weights must be floating point: an integer or bool tensor would be cast to fp32 by the probe (and so "agree"
  with itself) while the written model keeps integer weights that no hf_moe layer can use.
- Function preservation is measured on finite logits only: NaN compares false with everything, so a NaN in
  a probe forward must make the result NOT exact, with the reason, instead of vanishing in a max().
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .checkpoint_io import CheckpointError


def require_floating_weights(keys: Iterable[str], dtype_of: Callable[[str], torch.dtype], source: str) -> None:
    """Raise a CheckpointError naming the first tensors of `source` that are not floating point."""
    wrong = [f"{key} ({dtype_of(key)})" for key in sorted(keys) if not dtype_of(key).is_floating_point]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(f"{source} holds {len(wrong)} non-floating-point weights: {', '.join(wrong[:3])}{more}. "
                              "hf_moe converts floating-point checkpoints only (fp32, fp16, bf16, fp8); "
                              "quantized integer weights must be dequantized first.")


def nan_max(current: float, value: float) -> float:
    """max() that keeps a NaN once seen (Python's max(0.0, nan) is 0.0)."""
    if math.isnan(current):
        return current
    return value if math.isnan(value) or value > current else current


def non_finite_logits(max_abs_logit_diff: float, max_abs_logit: float | None) -> str | None:
    """Why a probe comparison cannot count as exact because its logits are not finite (None when they are)."""
    if max_abs_logit is not None and not math.isfinite(max_abs_logit):
        return ("the dense model's own probe logits are not finite (NaN/inf): the checkpoint holds non-finite "
                "weights or overflows in fp32, so function preservation cannot be measured")
    if not math.isfinite(max_abs_logit_diff):
        return "the MoE model's probe logits are not finite (NaN/inf) although the dense model's are"
    return None


__all__ = ["nan_max", "non_finite_logits", "require_floating_weights"]
