"""Mistral: GQA without biases, a sliding window on every layer (`sliding_window`), a SwiGLU FFN. A dense
source for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ._shared import DENSE_DECODER_LAYER, DENSE_IMPORT, dense_fields

FAMILY = DenseFamily(
    model_type="mistral",
    layer=DENSE_DECODER_LAYER,
    to_moe=lambda hf: dense_fields(hf, attention_bias=False, attention_out_bias=False),
    import_refusals=DENSE_IMPORT,
)
