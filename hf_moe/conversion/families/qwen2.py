"""Qwen2 (and Qwen2.5): GQA whose q/k/v always carry a bias and o_proj never, a sliding window on every
layer or none (a window on some layers only, `max_window_layers`, is refused), a SwiGLU FFN. A dense source
for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ._shared import DENSE_DECODER_LAYER, DENSE_IMPORT, dense_fields

FAMILY = DenseFamily(
    model_type="qwen2",
    layer=DENSE_DECODER_LAYER,
    to_moe=lambda hf: dense_fields(hf, attention_bias=True, attention_out_bias=False),
    import_refusals=DENSE_IMPORT,
)
