"""OLMo 2: RMSNorm on each sub-layer's output before the residual add (`sublayer_norm="post"`, norms named
`post_attention_layernorm` / `post_feedforward_layernorm`), q/k RMSNorm over the whole projection, one
`attention_bias` flag for q/k/v/o, a SwiGLU FFN. A dense source for upcycling."""

from __future__ import annotations

from ..records import DenseFamily
from ..tables import same
from ._shared import DENSE_IMPORT, DENSE_MLP, GQA_ATTENTION, dense_fields, one_attention_bias

FAMILY = DenseFamily(
    model_type="olmo2",
    layer=same("", "post_attention_layernorm.weight", "post_feedforward_layernorm.weight") + GQA_ATTENTION + DENSE_MLP,
    to_moe=lambda hf: dict(dense_fields(hf, one_attention_bias(hf), one_attention_bias(hf), qk_norm="full"),
                           sublayer_norm="post"),
    import_refusals=DENSE_IMPORT,
)
