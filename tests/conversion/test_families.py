"""Oracle tests of the family tables: transformers' own model and ours, same weights, same fp32 logits.

For each family: a tiny config of transformers' own class, its own ForCausalLM with every weight randomised
(norms not ones, router weights, DeepSeek-V3's balancing bias non-zero), converted to hf_moe with
`config_to_moe` + `state_dict_to_moe`, loaded strictly into MoEForCausalLM, both run in eval/fp32/eager;
then exported back (identical tensors, strict load into transformers' class, same logits) in both layouts.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from hf_moe.conversion.families import StateDictConverter, bind_table, state_dict_from_moe, state_dict_to_moe
from hf_moe.conversion.family_configs import config_from_moe, config_to_moe
from hf_moe.modeling.configuration import MoEConfig
from hf_moe.modeling.model import MoEForCausalLM

TOL = 1e-5
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
MLA = dict(kv_lora_rank=32, num_key_value_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, intermediate_size=96,
           moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3)  # fmt: skip
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # fmt: skip

# name -> (family config class, fields, left padding in the batch)
CASES: dict[str, tuple[type[PreTrainedConfig], dict, bool]] = {
    "deepseek_v3_qlora_yarn": (DeepseekV3Config, dict(
        TINY, **MLA, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=0, rope_parameters=YARN,
        attention_bias=True), True),
    "deepseek_v3_no_qlora": (DeepseekV3Config, dict(
        TINY, **MLA, q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=2,
        routed_scaling_factor=1.5, norm_topk_prob=False, num_mtp_layers=0, rope_interleave=False,
        tie_word_embeddings=True), False),
    "deepseek_v2_group_limited": (DeepseekV2Config, dict(
        TINY, **MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.5), True),
    "deepseek_v2_greedy_qlora": (DeepseekV2Config, dict(
        TINY, **MLA, q_lora_rank=24, n_shared_experts=1, topk_method="greedy", first_k_dense_replace=0),
        False),
    "mixtral": (MixtralConfig, dict(
        TINY, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02), True),
    "mixtral_sliding": (MixtralConfig, dict(
        TINY, num_key_value_heads=1, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4), False),
    "qwen2_moe": (Qwen2MoeConfig, dict(
        TINY, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
        norm_topk_prob=False), True),
    "qwen2_moe_mlp_only": (Qwen2MoeConfig, dict(
        TINY, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        norm_topk_prob=True), False),
    "qwen3_moe": (Qwen3MoeConfig, dict(
        TINY, num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True), True),
    "olmoe": (OlmoeConfig, dict(
        TINY, num_key_value_heads=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=0.6, eos_token_id=2,
        norm_topk_prob=False), True),
}  # fmt: skip


def randomise(model: torch.nn.Module) -> None:
    """Every parameter and persistent buffer random (norm weights around 1, routers decisive)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif ".gate.weight" in name:
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))


def family_model(case: str) -> tuple[torch.nn.Module, PreTrainedConfig]:
    config_cls, fields, _ = CASES[case]
    torch.manual_seed(0)
    config = config_cls(**fields)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    randomise(model)
    return model.eval(), config


def inputs(left_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=gen)
    mask = torch.ones_like(input_ids)
    if left_padding:
        mask[1, :4] = 0
    return input_ids, mask


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def ours_from(moe_config: MoEConfig, state: dict[str, torch.Tensor]) -> MoEForCausalLM:
    moe_config._attn_implementation = "eager"
    model = MoEForCausalLM(moe_config).eval()
    result = model.load_state_dict(state, strict=False)
    # hf_moe state dicts leave out a tied head (it is the embedding)
    allowed_missing = {"lm_head.weight"} if moe_config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing, result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    return model


def per_expert(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The original checkpoint naming, written independently of the tables (per-expert keys)."""
    moe, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else ("mlp", (
        "gate_proj", "up_proj", "down_proj"))  # fmt: skip
    out = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".mlp.")
        if name == "experts.gate_up_proj":
            for e, fused in enumerate(tensor):
                g, u = fused.chunk(2, dim=0)
                out[f"{prefix}.{moe}.experts.{e}.{gate}.weight"] = g.clone()
                out[f"{prefix}.{moe}.experts.{e}.{up}.weight"] = u.clone()
        elif name == "experts.down_proj":
            for e, d in enumerate(tensor):
                out[f"{prefix}.{moe}.experts.{e}.{down}.weight"] = d.clone()
        elif name == "gate.weight":
            out[f"{prefix}.{moe}.gate.weight"] = tensor
        else:
            out[key] = tensor
    return out


@pytest.mark.usefixtures("cpu_gemm")  # our products on torch.mm and on oneDNN
@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_logits_and_round_trip(case: str, tmp_path) -> None:
    family = CASES[case][0].model_type
    theirs, their_config = family_model(case)
    input_ids, mask = inputs(CASES[case][2])
    expected = logits_of(theirs, input_ids, mask)
    their_state = theirs.state_dict()

    moe_config = config_to_moe(their_config)
    ours_state = state_dict_to_moe(family, their_state, moe_config)
    ours = ours_from(moe_config, ours_state)
    got = logits_of(ours, input_ids, mask)
    valid = mask.bool()
    diff = (got - expected)[valid].abs().max().item()
    assert diff < TOL, f"{case}: max |logits diff| = {diff:.3g}"

    # the original per-expert naming imports to the same tensors
    from_original = state_dict_to_moe(family, per_expert(their_state, family), moe_config)
    assert from_original.keys() == ours_state.keys()
    assert all(torch.equal(from_original[k], ours_state[k]) for k in ours_state)

    # export: identical tensors, strict load into transformers' class built from the exported config
    exported = state_dict_from_moe(family, ours.state_dict(), moe_config)
    assert exported.keys() == their_state.keys()
    for key, tensor in their_state.items():
        assert torch.equal(exported[key], tensor), key
    back_config = config_from_moe(moe_config, family)
    back = AutoModelForCausalLM.from_config(back_config, attn_implementation="eager", experts_implementation="eager")
    back.load_state_dict(exported, strict=True)
    assert torch.equal(logits_of(back.eval(), input_ids, mask), expected)

    # export in the original layout: transformers' from_pretrained converts it back to its fused tensors
    original = state_dict_from_moe(family, ours.state_dict(), moe_config, layout="original")
    assert original.keys() == per_expert(their_state, family).keys() - (
        {"lm_head.weight"} if moe_config.tie_word_embeddings else set()
    )
    back_config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    assert torch.equal(logits_of(loaded.eval(), input_ids, mask), expected)


def test_config_round_trip_keeps_every_mapped_field() -> None:
    for case, (config_cls, fields, _) in CASES.items():
        their_config = config_cls(**fields)
        moe_config = config_to_moe(their_config)
        back = config_from_moe(moe_config, their_config.model_type)
        assert type(back) is config_cls
        for name in fields:
            if name == "mlp_only_layers":  # re-expressed through decoder_sparse_step; same MoE layers
                continue
            assert getattr(back, name) == getattr(their_config, name), (case, name)
        assert config_to_moe(back).to_dict() == moe_config.to_dict(), case


def test_family_specific_fields() -> None:
    v3 = config_to_moe(DeepseekV3Config(**CASES["deepseek_v3_qlora_yarn"][1]))
    assert (v3.attention_type, v3.scoring_func, v3.topk_method) == ("mla", "sigmoid", "noaux_tc")
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor, v3.attention_out_bias) == (4, 2, 2.5, True)
    assert v3.router_bias_update_rate > 0
    released = DeepseekV3Config(**CASES["deepseek_v3_no_qlora"][1], aux_loss_alpha=0.001, seq_aux=True)
    assert config_to_moe(released).seq_aux_loss_alpha == 0.001  # extra fields of DeepSeek's config.json
    v2 = config_to_moe(DeepseekV2Config(**CASES["deepseek_v2_group_limited"][1], norm_topk_prob=True))
    assert (v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.rope_interleave) == (
        "softmax", "group_limited_greedy", False, True)  # fmt: skip
    mixtral = config_to_moe(MixtralConfig(**CASES["mixtral_sliding"][1]))
    assert (mixtral.norm_topk_prob, mixtral.n_shared_experts, mixtral.first_k_dense_replace) == (True, 0, 0)
    assert (mixtral.sliding_window, mixtral.router_bias_update_rate) == (4, 0.0)
    converted = config_to_moe(MixtralConfig(**CASES["mixtral"][1]))
    layers = len(converted.moe_layer_indices)
    assert converted.aux_loss_alpha == pytest.approx(0.02 * 2 / layers)  # coef * K / L: same strength
    qwen2 = config_to_moe(Qwen2MoeConfig(**CASES["qwen2_moe"][1]))
    assert (qwen2.first_k_dense_replace, qwen2.moe_layer_freq, qwen2.moe_layer_indices) == (1, 2, [1, 3])
    assert (qwen2.shared_expert_gate, qwen2.shared_intermediate_size) == (True, 48)
    assert (qwen2.attention_bias, qwen2.attention_out_bias) == (True, False)
    assert config_to_moe(Qwen3MoeConfig(**CASES["qwen3_moe"][1])).qk_norm == "head"
    olmoe = config_to_moe(OlmoeConfig(**CASES["olmoe"][1]))
    assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.norm_topk_prob) == ("full", 0.6, False)


def test_import_refuses_what_hf_moe_cannot_express() -> None:
    base = CASES["qwen2_moe_mlp_only"][1]
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_to_moe(Qwen2MoeConfig(**{**base, "mlp_only_layers": [2]}))  # MoE layers 0, 1 of 3
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_to_moe(Qwen2MoeConfig(**base, use_sliding_window=True, sliding_window=4, max_window_layers=3))
    with pytest.raises(ValueError, match="topk_method"):
        config_to_moe(DeepseekV2Config(**{**CASES["deepseek_v2_greedy_qlora"][1], "topk_method": "noaux_tc"}))


def test_export_refuses_what_the_family_cannot_express() -> None:
    moe = config_to_moe(MixtralConfig(**CASES["mixtral"][1]))
    sigmoid = MoEConfig(**{**moe.to_dict(), "scoring_func": "sigmoid", "norm_topk_prob": True})
    with pytest.raises(ValueError, match="scoring_func"):
        config_from_moe(sigmoid, "mixtral")
    with pytest.raises(ValueError, match="attention_type"):
        config_from_moe(moe, "deepseek_v3")
    with pytest.raises(ValueError, match="qk_norm"):
        config_from_moe(moe, "qwen3_moe")
    v3 = config_to_moe(DeepseekV3Config(**CASES["deepseek_v3_no_qlora"][1]))
    with pytest.raises(ValueError, match="norm_topk_prob|scoring_func"):
        config_from_moe(v3, "deepseek_v2")
    # a trained (non-zero) balancing bias has no place in a family without one
    theirs, their_config = family_model("qwen3_moe")
    moe = config_to_moe(their_config)
    state = state_dict_to_moe("qwen3_moe", theirs.state_dict(), moe)
    state["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.full((8,), 0.01)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        state_dict_from_moe("qwen3_moe", state, moe)


def test_unknown_and_incomplete_keys_are_reported() -> None:
    theirs, their_config = family_model("mixtral")
    state = per_expert(theirs.state_dict(), "mixtral")
    with pytest.raises(ValueError, match="not in the conversion table"):
        state_dict_to_moe("mixtral", {**state, "model.layers.0.block_sparse_moe.extra.weight": torch.ones(1)},
                          their_config)  # fmt: skip
    del state["model.layers.2.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match="incomplete"):
        state_dict_to_moe("mixtral", state, their_config)


def test_streaming_push_emits_stacked_experts_when_complete() -> None:
    theirs, their_config = family_model("olmoe")
    moe = config_to_moe(their_config)
    state = per_expert(theirs.state_dict(), "olmoe")
    converter = StateDictConverter("olmoe", moe, "to_moe")
    plan = converter.plan(state)
    assert len(plan["model.layers.0.mlp.experts.gate_up_proj"]) == 2 * moe.n_routed_experts
    outputs: dict[str, torch.Tensor] = {}
    for key in reversed(list(state)):  # any order, as shards come
        done = converter.push(key, state[key])
        assert all(k not in outputs for k, _ in done)
        outputs.update(done)
    converter.finish()
    assert outputs.keys() == state_dict_to_moe("olmoe", theirs.state_dict(), moe).keys()


def mtp_case() -> tuple[torch.nn.Module, DeepseekV3Config, dict[str, torch.Tensor]]:
    """A DeepSeek-V3 model plus an on-disk MTP module at layer N, written by hand in the released layout."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    fields = dict(CASES["deepseek_v3_qlora_yarn"][1], num_mtp_layers=0)
    theirs, config = family_model("deepseek_v3_qlora_yarn")
    n = config.num_hidden_layers
    torch.manual_seed(2)
    layer = DeepseekV3DecoderLayer(config, layer_idx=n)
    randomise(layer)
    disk = per_expert({f"model.layers.{n}.{k}": v for k, v in layer.state_dict().items()}, "deepseek_v3")
    h = config.hidden_size
    disk.update({
        f"model.layers.{n}.enorm.weight": 1 + 0.2 * torch.randn(h), f"model.layers.{n}.hnorm.weight": 1 + 0.2 * torch.randn(h),
        f"model.layers.{n}.eh_proj.weight": 0.1 * torch.randn(h, 2 * h),
        f"model.layers.{n}.shared_head.norm.weight": 1 + 0.2 * torch.randn(h),
        f"model.layers.{n}.shared_head.head.weight": theirs.lm_head.weight.detach().clone(),
        f"model.layers.{n}.embed_tokens.weight": theirs.model.embed_tokens.weight.detach().clone(),
    })  # fmt: skip
    disk.update(per_expert(theirs.state_dict(), "deepseek_v3"))
    config = DeepseekV3Config(**{**fields, "num_mtp_layers": 1})
    return layer.eval(), config, disk


def test_deepseek_v3_mtp_layers_map_both_ways() -> None:
    hf_layer, config, disk = mtp_case()
    moe = config_to_moe(config)
    assert moe.num_nextn_predict_layers == 1
    ours_state = state_dict_to_moe("deepseek_v3", disk, moe)
    n = config.num_hidden_layers
    assert torch.equal(ours_state["mtp.0.norm.weight"], disk[f"model.layers.{n}.shared_head.norm.weight"])
    assert not any(k.startswith("model.layers.3") for k in ours_state)
    ours = ours_from(moe, ours_state)

    # the MTP block computes what transformers' decoder layer computes
    x = torch.randn(2, 7, config.hidden_size)
    pos = torch.arange(7)[None]
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        hf_out = hf_layer(x, attention_mask=causal, position_embeddings=hf_rotary(config, x, pos))
        our_out = ours.mtp[0].block(x, attention_mask=causal, position_embeddings=ours.model.rotary_emb(x, pos))[0]
    assert (hf_out - our_out).abs().max().item() < TOL

    # export writes the released layout again, copies of the embedding and head included
    original = state_dict_from_moe("deepseek_v3", ours.state_dict(), moe, layout="original")
    assert original.keys() == disk.keys()
    assert all(torch.equal(original[k], disk[k]) for k in disk)

    # an MTP copy of the head that differs from the head is refused
    bad = dict(disk)
    bad[f"model.layers.{n}.shared_head.head.weight"] = bad[f"model.layers.{n}.shared_head.head.weight"] + 1
    with pytest.raises(ValueError, match="copy"):
        state_dict_to_moe("deepseek_v3", bad, moe)
    # a config promising MTP weights the checkpoint lacks is refused with a hint
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        state_dict_to_moe("deepseek_v3", {k: v for k, v in disk.items() if f"layers.{n}." not in k}, moe)


def hf_rotary(config: DeepseekV3Config, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    return DeepseekV3RotaryEmbedding(config)(x, pos)


def test_tables_bind_every_family() -> None:
    for case, (config_cls, fields, _) in CASES.items():
        moe = config_to_moe(config_cls(**fields))
        for layout in ("transformers", "original"):
            bindings = bind_table(config_cls.model_type, moe, layout)
            ours_keys = [b.ours for b in bindings if b.op not in ("duplicate", "drop")]
            assert len(ours_keys) == len(set(ours_keys)), (case, layout)


def test_switch_loss_coefficient_maps_to_the_same_loss_value() -> None:
    """One MoE layer: transformers' Mixtral balance loss == our aux loss with the converted coefficient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from hf_moe.modeling.losses import moe_auxiliary_loss
    from hf_moe.modeling.routing import RouterOutput

    mixtral = MixtralConfig(**dict(CASES["mixtral"][1], num_hidden_layers=1))
    ours = config_to_moe(mixtral)
    logits = torch.randn(12, 4)
    topk_ids = logits.softmax(-1).topk(2, dim=-1).indices
    theirs = mixtral.router_aux_loss_coef * load_balancing_loss_func((logits,), 4, 2)
    routing = RouterOutput(logits=logits, topk_ids=topk_ids, topk_weights=torch.ones(12, 2))
    torch.testing.assert_close(moe_auxiliary_loss([routing], None, (3, 4), ours), theirs)
    back = config_from_moe(ours, "mixtral")
    assert back.router_aux_loss_coef == pytest.approx(mixtral.router_aux_loss_coef)
