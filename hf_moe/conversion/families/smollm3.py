"""SmolLM3: Llama's decoder (one `attention_bias` flag for q/k/v/o) with NoPE layers (`no_rope_layers`, 0 =
no RoPE: every 4th layer by default, hf_moe's `nope_layers`) and an optional sliding window on NoPE layers
(`layer_types`). A dense source for upcycling."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..records import DenseFamily, Refusal
from ._shared import DENSE_DECODER_LAYER, dense_fields, one_attention_bias


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    fields = dense_fields(hf, one_attention_bias(hf), one_attention_bias(hf))
    nope = [i for i, rotates in enumerate(hf.no_rope_layers[: hf.num_hidden_layers]) if not rotates]
    fields.update(nope_layers=nope or None, layer_types=list(hf.layer_types[: hf.num_hidden_layers]),
                  sliding_window=hf.sliding_window if hf.use_sliding_window else None)  # fmt: skip
    if fields["sliding_window"] is None:  # without use_sliding_window transformers applies no window
        fields["layer_types"] = None
    return fields


FAMILY = DenseFamily(
    model_type="smollm3",
    layer=DENSE_DECODER_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("mlp_bias", lambda hf: not hf.mlp_bias, "hf_moe FFNs and experts have no biases"),
        Refusal("layer_types", lambda hf: hf.use_sliding_window or "sliding_attention" not in hf.layer_types,
                "it lists sliding layers but use_sliding_window is off (transformers then applies no window)"),
    ),
)
