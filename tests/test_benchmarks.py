"""The benchmark's generate() timing on tiny models: every step is stamped, tokens are compared."""

import sys
from pathlib import Path

import torch
from transformers import DeepseekV3ForCausalLM

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.conversion.families import config_from_moe, state_dict_from_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generate_bench import StepClock, bench_generate  # noqa: E402


def tiny_pair() -> tuple[MoEForCausalLM, DeepseekV3ForCausalLM]:
    torch.manual_seed(0)
    config = MoEConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                       qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1)
    ours = MoEForCausalLM(config)
    theirs = DeepseekV3ForCausalLM(config_from_moe(config, "deepseek_v3"))
    theirs.load_state_dict(state_dict_from_moe("deepseek_v3", ours.state_dict(), config), strict=True)
    return ours, theirs


def test_step_clock_stamps_every_generation_step() -> None:
    ours, _ = tiny_pair()
    clock = StepClock()
    ours.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  logits_processor=[clock], pad_token_id=0)
    assert len(clock.stamps) == 5
    assert clock.seconds_per_token() > 0


def test_bench_generate_times_both_models_and_compares_their_tokens() -> None:
    ours, theirs = tiny_pair()

    def set_experts(model: torch.nn.Module, implementation: str) -> None:
        model.config._experts_implementation = implementation

    result = bench_generate(ours, theirs, 128, context=16, new_tokens=4, rounds=2, device=torch.device("cpu"),
                            set_experts=set_experts, contenders=("ours", "transformers_eager"))
    assert result["errors"] == {}
    assert set(result["seconds_per_token"]) == {"ours", "transformers_eager"}
    assert all(len(v) == 2 for v in result["rounds_seconds"].values())
    assert result["same_greedy_tokens_as_ours"] == {"ours": True, "transformers_eager": True}
    assert result["speedup_ours_vs_fastest_transformers"] > 0
