"""transformers' generic model and config tests (ModelTesterMixin, ConfigTester from its source distribution) on
hf_moe's MLA and GQA MoEForCausalLM (with MoEModel) and on MoEForSequenceClassification."""

from __future__ import annotations

import builtins

from hf_moe import MoEConfig, MoEForCausalLM, MoEForSequenceClassification, MoEModel
from hf_moe.modeling.configuration import GQA_ONLY_FIELDS

from . import upstream
from .suites import common, make_suite

upstream.register_model_names(common, "hf_moe", base=MoEModel, causal_lm=MoEForCausalLM,
                              sequence_classification=MoEForSequenceClassification)


def _has_field(obj: object, name: str) -> bool:
    """test_modeling_common reads `hasattr(config, "sliding_window")` as "this model supports a sliding window" and
    then sets it to 2. MoEConfig declares the field for every attention type, but MLA (like DeepseekV3, whose
    config has no such field) supports none: for an MLA config the GQA-only fields count as absent, so the test
    runs on MLA exactly as it runs on DeepseekV3."""
    if name in GQA_ONLY_FIELDS and isinstance(obj, MoEConfig) and obj.attention_type == "mla":
        return False
    return builtins.hasattr(obj, name)


common.hasattr = _has_field  # a module global shadows the builtin for test_modeling_common's code only

SHAPE = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
             first_k_dense_replace=1,
             # as transformers' DeepseekV3 and Qwen3-MoE: no bias balancing (it refuses use_reentrant=True, which
             # the suite tests; that refusal and its reason are tested in test_conventions.py)
             router_bias_update_rate=0.0)
MLA = dict(SHAPE, attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1)
GQA = dict(SHAPE, attention_type="gqa", num_key_value_heads=2, head_dim=8, scoring_func="softmax",
           topk_method="greedy", qk_norm="head")

#: Where hf_moe departs from transformers on purpose (strict xfails: a test that starts passing is noticed).
DIVERGENCES = {
    "test_sdpa_can_dispatch_non_composite_models": (
        "hf_moe's default attention (attn_implementation None/'auto') is its registered 'hf_moe_sdpa' (torch sdpa's "
        "semantics, a faster CPU kernel), by design (docs/architecture.md); the test expects the default to be "
        "named 'sdpa'. attn_implementation='sdpa' gives torch's own, and the eager-vs-sdpa tests pass"),
    "test_moe_models_record_router_logits": (
        "hf_moe collects router logits in its own forward (returned with output_router_logits=True or the config's "
        "flag: test_output_router_logits_from_config passes) instead of transformers' output-capturing hooks; the "
        "test reads the hooks' table `_can_record_outputs`, which hf_moe does not declare because it does not use "
        "them, and the forward's evaluated return annotation (a string under `from __future__ import annotations`)"),
}
MoEMLACausalLMTest = make_suite("MoEMLACausalLMTest", MoEConfig, MLA, (MoEModel, MoEForCausalLM), DIVERGENCES)
MoEGQACausalLMTest = make_suite("MoEGQACausalLMTest", MoEConfig, GQA, (MoEModel, MoEForCausalLM), DIVERGENCES)
MoESequenceClassificationTest = make_suite("MoESequenceClassificationTest", MoEConfig, MLA,
                                           (MoEForSequenceClassification,), DIVERGENCES)
