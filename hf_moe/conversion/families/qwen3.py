"""Qwen3: GQA with per-head q/k RMSNorm and one `attention_bias` flag for q/k/v/o, a SwiGLU FFN. A dense
source for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ._shared import DENSE_DECODER_LAYER, DENSE_IMPORT, dense_fields, one_attention_bias

FAMILY = DenseFamily(
    model_type="qwen3",
    layer=DENSE_DECODER_LAYER,
    to_moe=lambda hf: dense_fields(hf, one_attention_bias(hf), one_attention_bias(hf), qk_norm="head"),
    import_refusals=DENSE_IMPORT,
)
