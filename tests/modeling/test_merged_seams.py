"""Where independently built features meet (found by review of the merged branches): each test fails without
its fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.modeling.configuration import ConfigFieldError
from hf_moe.modeling.experts import RoutedExperts
from hf_moe.modeling.moe import gated_inputs
from tests.conftest import tiny_config, tiny_gqa_config

IDS = torch.randint(3, 97, (2, 12))


def test_reentrant_checkpointing_is_refused_where_a_balance_loss_would_lose_its_gradient() -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=0.0, aux_loss_alpha=0.1))
    with pytest.raises(ValueError, match="balance loss"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.gradient_checkpointing_enable()  # non-reentrant: the aux loss keeps its gradient
    out = model.train()(IDS, labels=IDS)
    assert out.aux_loss.requires_grad


@pytest.mark.parametrize(("fields", "field"), [
    (dict(router_type="hash", topk_method="sparsemixer", scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
          num_nextn_predict_layers=0, router_bias_update_rate=0.0), "topk_method"),
    (dict(topk_method="sparsemixer", scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
          router_bias_update_rate=1e-3),
     "router_bias_update_rate"),
    (dict(router_type="expert_choice", router_bias=True, n_group=1, topk_group=1, topk_method="greedy"), "router_bias"),
    (dict(attention_type="gqa", moa_experts=4, moa_top_k=2, num_key_value_heads=2, head_dim=8, q_lora_rank=None,
          kv_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None, v_head_dim=None, attention_bias=True),
     "attention_bias"),
])
def test_combinations_a_feature_would_silently_ignore_are_refused(fields: dict, field: str) -> None:
    base = tiny_config().to_dict()
    base.update(fields)
    with pytest.raises(ConfigFieldError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**{k: v for k, v in base.items() if k in MoEConfig.__dataclass_fields__})


def test_replay_with_sparsemixer_is_refused() -> None:
    model = MoEForCausalLM(tiny_gqa_config(topk_method="sparsemixer", router_bias_update_rate=0.0, norm_topk_prob=False)).eval()
    replay = [torch.zeros(2, 12, 2, dtype=torch.long) for _ in model.config.moe_layer_indices]
    with pytest.raises(ValueError, match="replay_routing.*sparsemixer"):
        model(IDS, replay_routing=replay)


def test_mtp_logits_are_scaled_like_the_lm_head_logits() -> None:
    """logits_scaling = s with the head's weights times s is the same function as s = 1: equal LM and MTP losses."""
    config = tiny_config(num_nextn_predict_layers=1, mtp_loss_weight=0.5, tie_word_embeddings=False)
    plain = MoEForCausalLM(config).train()
    scaled = MoEForCausalLM(tiny_config(num_nextn_predict_layers=1, mtp_loss_weight=0.5, tie_word_embeddings=False,
                                        logits_scaling=8.0)).train()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        scaled.lm_head.weight.mul_(8.0)
    a, b = plain(IDS, labels=IDS), scaled(IDS, labels=IDS)
    torch.testing.assert_close(b.lm_loss, a.lm_loss)
    torch.testing.assert_close(b.mtp_loss, a.mtp_loss)


def test_generate_batch_with_mixed_layer_types_gives_generates_tokens() -> None:
    model = MoEForCausalLM(tiny_gqa_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                           sliding_window=4)).eval()
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (7, 9)]
    expected = [model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    results = model.generate_batch(
        prompts, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64),
        warmup=False)
    assert [r.error for r in results.values()] == [None, None]
    assert [r.generated_tokens for r in results.values()] == expected


def test_sinks_missing_from_a_checkpoint_are_initialised(tmp_path) -> None:
    config = tiny_gqa_config(attention_sinks=True, qk_norm=None)
    MoEForCausalLM(config).save_pretrained(tmp_path, remote_code=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("self_attn.sinks")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = MoEForCausalLM.from_pretrained(tmp_path, strict=False)
    for layer in loaded.model.layers:
        assert torch.equal(layer.self_attn.sinks.detach(), torch.zeros_like(layer.self_attn.sinks))


def test_gate_on_expert_input_drops_slots_with_gate_zero_even_with_expert_biases() -> None:
    experts = RoutedExperts(tiny_config(expert_bias=True, gate_on_expert_input=True))
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.5)
    tokens = torch.randn(3, experts.hidden_dim)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    weights = torch.tensor([[0.0, 0.0], [0.7, 0.0], [0.2, 0.8]])  # token 0 dropped entirely, token 1 half
    out = gated_inputs(experts, tokens, ids, weights)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    single = gated_inputs(experts, tokens[1:2], ids[1:2, :1], weights[1:2, :1])
    torch.testing.assert_close(out[1], single[0])


def test_first_compile_in_a_fresh_process_is_one_graph() -> None:
    """The CPU GEMM probe must not run inside a trace (the "linear" kernel asks `eligible` first)."""
    code = """
import torch, hf_moe
from tests.conftest import tiny_config
model = hf_moe.MoEForCausalLM(tiny_config()).eval()
ids = torch.randint(3, 97, (1, 8))
with torch.no_grad():
    torch.compile(lambda x: model(x).logits, fullgraph=True, backend="eager")(ids)
print("one graph")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "one graph" in done.stdout, done.stderr[-2000:]
