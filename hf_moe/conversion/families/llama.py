"""Llama (2, 3, 3.x; also the Llama-architecture models): GQA with one `attention_bias` flag for q/k/v/o,
optionally scaled RoPE (llama3, yarn, ...), a SwiGLU FFN. A dense source for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ._shared import DENSE_DECODER_LAYER, DENSE_IMPORT, dense_fields, one_attention_bias

FAMILY = DenseFamily(
    model_type="llama",
    layer=DENSE_DECODER_LAYER,
    to_moe=lambda hf: dense_fields(hf, one_attention_bias(hf), one_attention_bias(hf)),
    import_refusals=DENSE_IMPORT,
)
