"""Granite (IBM Granite 3.x dense): Llama's decoder (one `attention_bias` flag for q/k/v/o) with muP's
multipliers: `attention_multiplier` as the softmax scale, `embedding_multiplier`, `residual_multiplier` on both
residual branches, logits divided by `logits_scaling`. A dense source for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ._shared import DENSE_DECODER_LAYER, DENSE_IMPORT, dense_fields, one_attention_bias

FAMILY = DenseFamily(
    model_type="granite",
    layer=DENSE_DECODER_LAYER,
    to_moe=lambda hf: dict(
        dense_fields(hf, one_attention_bias(hf), one_attention_bias(hf)),
        attention_multiplier=float(hf.attention_multiplier), embedding_multiplier=float(hf.embedding_multiplier),
        residual_multiplier=float(hf.residual_multiplier), logits_scaling=float(hf.logits_scaling),
    ),
    import_refusals=DENSE_IMPORT,
)
