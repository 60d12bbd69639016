"""transformers' generic model and config tests (ModelTesterMixin, ConfigTester from its source distribution) on
hf_moe's MLA and GQA MoEForCausalLM (with MoEModel) and on MoEForSequenceClassification."""

from __future__ import annotations

from hf_moe import MoEConfig, MoEForCausalLM, MoEForSequenceClassification, MoEModel

from . import upstream
from .suites import common, make_suite

upstream.register_model_names(common, "hf_moe", base=MoEModel, causal_lm=MoEForCausalLM,
                              sequence_classification=MoEForSequenceClassification)

SHAPE = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
             first_k_dense_replace=1)
MLA = dict(SHAPE, attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1)
GQA = dict(SHAPE, attention_type="gqa", num_key_value_heads=2, head_dim=8, scoring_func="softmax",
           topk_method="greedy", qk_norm="head")

MoEMLACausalLMTest = make_suite("MoEMLACausalLMTest", MoEConfig, MLA, (MoEModel, MoEForCausalLM))
MoEGQACausalLMTest = make_suite("MoEGQACausalLMTest", MoEConfig, GQA, (MoEModel, MoEForCausalLM))
MoESequenceClassificationTest = make_suite("MoESequenceClassificationTest", MoEConfig, MLA,
                                           (MoEForSequenceClassification,))
