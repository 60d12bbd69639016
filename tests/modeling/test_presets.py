"""Presets reproduce the published parameter counts; the model's count agrees with an independent formula.

Every count is taken from `MoEForCausalLM` built on the meta device (no memory), so these tests run in seconds.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import pytest

from hf_moe.inspection import PARTS, ParameterCount, count_parameters, format_parameter_report
from hf_moe.modeling.configuration import MoEConfig
from hf_moe.presets import PRESETS

B = 1e9

# name -> (published total, published active, where it is published)
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "deepseek-moe-16b": (16.4 * B, 2.8 * B, "DeepSeekMoE paper arXiv 2401.06066 §5 / deepseek-moe-16b-base card"),
    "deepseek-v2-lite": (15.7 * B, 2.4 * B, "DeepSeek-V2 paper arXiv 2405.04434 App. B / DeepSeek-V2-Lite card"),
    "deepseek-v2": (236 * B, 21 * B, "DeepSeek-V2 paper arXiv 2405.04434 abstract"),
    "deepseek-v3": (671 * B, 37 * B, "DeepSeek-V3 report arXiv 2412.19437 abstract (main model, without MTP)"),
    "mixtral-8x7b": (46.7 * B, 12.9 * B, "Mistral AI 'Mixtral of experts' blog / arXiv 2401.04088"),
    "qwen1.5-moe-a2.7b": (14.3 * B, 2.7 * B, "Qwen blog 'Qwen1.5-MoE' / Qwen1.5-MoE-A2.7B card"),
    "qwen3-moe-30b-a3b": (30.5 * B, 3.3 * B, "Qwen3-30B-A3B model card"),
    "olmoe-1b-7b": (6.9 * B, 1.3 * B, "OLMoE paper arXiv 2409.02060 / OLMoE-1B-7B-0924 card"),
    "kimi-k2": (1000 * B, 32 * B, "Kimi K2 card / arXiv 2507.20534: 1T total, 32B activated"),
    "ernie-4.5-21b-a3b": (21 * B, 3 * B, "ERNIE-4.5-21B-A3B card: 21B total, 3B activated (rounded)"),
    "gpt-oss-120b": (116.83 * B, 5.13 * B, "gpt-oss model card arXiv 2508.10925 Table 1"),
    "gpt-oss-20b": (20.91 * B, 3.61 * B, "gpt-oss model card arXiv 2508.10925 Table 1"),
    "llama-4-scout": (109 * B, 17 * B, "Llama 4 Scout card: 17B active, 109B total"),
    "llama-4-maverick": (400 * B, 17 * B, "Llama 4 Maverick card: 17B active, 400B total"),
    "dbrx": (132 * B, 36 * B, "Databricks 'Introducing DBRX' blog: 132B total, 36B active"),
    # attention-side families (presets.ATTENTION_FAMILY_PRESETS)
    "glm-4.5": (355 * B, 32 * B, "GLM-4.5 report arXiv 2508.06471 abstract / zai-org/GLM-4.5 card"),
    "glm-4.5-air": (106 * B, 12 * B, "GLM-4.5 report arXiv 2508.06471 abstract / zai-org/GLM-4.5-Air card"),
    "minimax-m2": (230 * B, 10 * B, "MiniMaxAI/MiniMax-M2 model card"),
}
# DeepSeek-V2-Lite's 2.4B activated is only reproduced without the input embedding (a table lookup, not a
# matmul): 2.45B without it vs 2.66B with it. V2 (20.9B vs 21B) and V3 (36.6B vs 37B) fit the same definition
# (and are within 2% either way), so the DeepSeek-V2 family is compared without the input embedding. The other
# models' published active counts include embeddings and output head.
# Kimi-K2 (DeepSeek-V3's architecture: 31.7B) and gpt-oss (its card counts the unembedding, not the embedding:
# 5.13B / 3.61B exactly) follow the same definition; so does Ernie 4.5 (3.09B).
ACTIVE_WITHOUT_INPUT_EMBEDDING = {"deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "kimi-k2", "gpt-oss-120b",
                                  "gpt-oss-20b", "ernie-4.5-21b-a3b"}  # fmt: skip

# GLM-4.5 (32.1B vs 32B), GLM-4.5-Air (12.2B vs 12B) and MiniMax-M2 (9.8B vs 10B) publish active counts without
# the embedding and the output head (with them: 33.6B, 13.4B, 11.0B)
ACTIVE_WITHOUT_EMBEDDING_AND_HEAD = {"glm-4.5", "glm-4.5-air", "minimax-m2"}
TOLERANCE = 0.03
# ERNIE-4.5-21B-A3B's config.json counts 21.8B total: its card rounds to "21B" (3.9% off)
TOLERANCES = {"ernie-4.5-21b-a3b": 0.04}


@cache
def preset_count(name: str) -> ParameterCount:
    return count_parameters(MoEConfig.from_preset(name))


def _ffn(hidden: int, width: int, bias: bool = False) -> int:
    return 3 * hidden * width + bias * (2 * width + hidden)  # SwiGLU: gate, up, down (and their biases)


def _norm(config: MoEConfig, width: int) -> int:
    return width * (2 if config.norm_type == "layer_norm" and config.norm_bias else 1)


def analytic_layer(config: MoEConfig, moe: bool) -> dict[str, tuple[int, int]]:
    """(total, active) per part of one decoder layer, from the published formulas."""
    h, n = config.hidden_size, config.num_attention_heads
    bias = int(config.attention_bias)
    norms = 2 * _norm(config, h)
    if config.attention_type == "mla":
        qd = config.qk_head_dim
        r, kv = config.q_lora_rank, config.kv_lora_rank
        q = h * n * qd + bias * n * qd if r is None else h * r + bias * r + r * n * qd
        norms += kv + (r or 0)
        attn = (q + h * (kv + config.qk_rope_head_dim) + bias * (kv + config.qk_rope_head_dim)
                + kv * n * (config.qk_nope_head_dim + config.v_head_dim) + n * config.v_head_dim * h)
        attn += h * int(config.attention_out_bias)
    else:
        d, kvh = config.head_dim, config.num_key_value_heads
        attn = 2 * h * n * d + 2 * h * kvh * d + bias * (n + 2 * kvh) * d + h * int(config.attention_out_bias)
        attn += n * int(config.attention_sinks)
        norms += {None: 0, "head": 2 * d, "full": (n + kvh) * d}[config.qk_norm] * int(config.qk_norm_weight)
    parts = {"attention": (attn, attn), "norms": (norms, norms)}
    if moe:
        e, k = config.n_routed_experts, config.num_experts_per_tok
        routed = _ffn(h, config.moe_intermediate_size, config.expert_bias)
        shared = _ffn(h, config.shared_intermediate_size, config.mlp_bias) + h * int(config.shared_expert_gate)
        if not config.shared_intermediate_size:
            shared = 0
        router = e * h + e * int(config.router_bias)
        parts |= {"router": (router, router), "routed_experts": (e * routed, k * routed), "shared_experts": (shared, shared)}
    else:
        dense = _ffn(h, config.intermediate_size, config.mlp_bias)
        parts["dense_ffn"] = (dense, dense)
    return parts


def analytic_count(config: MoEConfig) -> ParameterCount:
    """Independent count from the architecture's formulas (checks the model's shapes)."""
    total, active = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)

    def add(part: str, t: int, a: int) -> None:
        total[part] += t
        active[part] += a

    v, h = config.vocab_size, config.hidden_size
    add("embeddings", v * h, v * h)
    if not config.tie_word_embeddings:
        add("lm_head", v * h, v * h)
    add("lm_head", v * int(config.lm_head_bias), v * int(config.lm_head_bias))
    add("norms", _norm(config, h), _norm(config, h))
    for i in range(config.num_hidden_layers):
        for part, (t, a) in analytic_layer(config, config.is_moe_layer(i)).items():
            add(part, t, a)
    block = analytic_layer(config, config.n_routed_experts > 0)
    per_mtp = 3 * h + 2 * h * h  # enorm, hnorm, norm; eh_proj
    depth = config.num_nextn_predict_layers
    add("mtp", depth * (per_mtp + sum(t for t, _ in block.values())), depth * (per_mtp + sum(a for _, a in block.values())))
    return ParameterCount(
        total=sum(n for p, n in total.items() if p != "mtp"), active=sum(n for p, n in active.items() if p != "mtp"),
        parts=total, active_parts=active,
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_published_counts(name: str) -> None:
    count = preset_count(name)
    published_total, published_active, source = PUBLISHED[name]
    active = count.active - (count.parts["embeddings"] if name in ACTIVE_WITHOUT_INPUT_EMBEDDING else 0)
    tolerance = TOLERANCES.get(name, TOLERANCE)
    if name in ACTIVE_WITHOUT_EMBEDDING_AND_HEAD:
        active -= count.parts["embeddings"] + count.parts["lm_head"]
    assert abs(count.total / published_total - 1) < tolerance, (name, count.total, published_total, source)
    assert abs(active / published_active - 1) < tolerance, (name, active, published_active, source)
    assert count.parts["other"] == 0
    config = MoEConfig.from_preset(name)
    routed, active_routed = count.parts["routed_experts"], count.active_parts["routed_experts"]
    assert active_routed * config.n_routed_experts == routed * config.num_experts_per_tok


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_count_agrees_with_formula(name: str) -> None:
    config = MoEConfig.from_preset(name)
    expected, got = analytic_count(config), preset_count(name)
    assert got.parts == expected.parts
    assert got.active_parts == expected.active_parts
    assert (got.total, got.active) == (expected.total, expected.active)


def test_qwen3_non_embedding_count() -> None:
    # Qwen3-30B-A3B card: "Number of Parameters (Non-Embedding): 29.9B" (embeddings and output head excluded)
    count = preset_count("qwen3-moe-30b-a3b")
    non_embedding = count.total - count.parts["embeddings"] - count.parts["lm_head"]
    assert abs(non_embedding / (29.9 * B) - 1) < 0.01


def test_deepseek_v3_mtp_is_separate() -> None:
    # Hugging Face card: 685B = 671B main model + 14B MTP module. The released MTP module carries its own copy of
    # the embedding and the output head (README_WEIGHTS), which our MTP shares with the main model.
    count = preset_count("deepseek-v3")
    assert count.parts["mtp"] > 10 * B
    assert count.total_with_mtp == count.total + count.parts["mtp"]
    checkpoint = count.total_with_mtp + count.parts["embeddings"] + count.parts["lm_head"]
    assert abs(checkpoint / (685 * B) - 1) < 0.01
    assert count.active_parts["mtp"] < count.parts["mtp"]
    assert preset_count("deepseek-v2").parts["mtp"] == 0


def test_tied_embeddings_counted_once() -> None:
    count = count_parameters(MoEConfig.from_preset("olmoe-1b-7b", tie_word_embeddings=True))
    untied = preset_count("olmoe-1b-7b")
    assert count.parts["lm_head"] == 0
    assert count.total == untied.total - untied.parts["lm_head"]


def test_count_of_a_built_model_equals_count_of_its_config() -> None:
    from hf_moe.modeling.model import MoEForCausalLM

    config = MoEConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, num_nextn_predict_layers=1,
    )
    model = MoEForCausalLM(config)
    from_model, from_config = count_parameters(model), count_parameters(config)
    assert from_model == from_config
    assert from_model.total_with_mtp == sum(p.numel() for p in model.parameters())
    assert from_config == analytic_count(config)


def test_report_lists_parts_and_routing() -> None:
    config = MoEConfig.from_preset("deepseek-v3")
    report = format_parameter_report(preset_count("deepseek-v3"), config)
    for text in ("routed_experts", "total (without MTP)", "671.03B", "mtp (not in total)", "256 routed experts",
                 "top-8", "sigmoid", "noaux_tc", "8 groups (keep 4)", "MLA", "3 dense, 58 MoE", "mtp depth: 1"):
        assert text in report, text
    gqa = format_parameter_report(preset_count("qwen3-moe-30b-a3b"), MoEConfig.from_preset("qwen3-moe-30b-a3b"))
    assert "GQA, 32 heads, 4 kv heads" in gqa and "no shared experts" in gqa and "mtp (not in total)" not in gqa


def test_preset_fields_are_config_fields() -> None:
    # MoEConfig accepts unknown keyword arguments silently, so a typo in a preset would go unnoticed
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    for name, preset in PRESETS.items():
        assert set(preset) <= fields, (name, set(preset) - fields)


def test_published_hyper_parameters() -> None:
    v3 = MoEConfig.from_preset("deepseek-v3")
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert (v3.scoring_func, v3.topk_method, v3.routed_scaling_factor) == ("sigmoid", "noaux_tc", 2.5)
    assert v3.router_bias_update_rate == 1e-3 and v3.seq_aux_loss_alpha == 1e-4 and v3.mtp_loss_weight == 0.3
    assert v3.num_mtp_layers == 1 and v3.moe_layer_indices[0] == 3 and v3.qk_head_dim == 192
    assert v3.rope_parameters["rope_type"] == "yarn" and v3.rope_parameters["factor"] == 40
    qwen = MoEConfig.from_preset("qwen1.5-moe-a2.7b")
    assert qwen.shared_intermediate_size == 5632 and qwen.shared_expert_gate and qwen.attention_bias
    assert not qwen.attention_out_bias
    assert MoEConfig.from_preset("mixtral-8x7b").num_local_experts == 8
    for name in PRESETS:
        config = MoEConfig.from_preset(name)
        assert (config.router_bias_update_rate > 0) == (
            name in ("deepseek-v3", "kimi-k2", "glm-4.5", "glm-4.5-air")), name
    glm = MoEConfig.from_preset("glm-4.5")
    assert (glm.rotary_dim, glm.qk_norm, glm.moe_layer_indices[0], glm.routed_scaling_factor) == (64, "head", 3, 2.5)
    assert MoEConfig.from_preset("minimax-m2").rotary_dim == 64


def test_new_family_presets_carry_their_variants() -> None:
    gpt = MoEConfig.from_preset("gpt-oss-120b")
    assert (gpt.glu_type, gpt.glu_limit, gpt.router_bias, gpt.expert_bias, gpt.attention_sinks) == (
        "gpt_oss", 7.0, True, True, True)
    scout, maverick = MoEConfig.from_preset("llama-4-scout"), MoEConfig.from_preset("llama-4-maverick")
    assert scout.gate_on_expert_input and scout.moe_layer_indices == list(range(48))
    assert maverick.moe_layer_indices == list(range(1, 48, 2)) and maverick.num_experts_per_tok == 1
    for llama4 in (scout, maverick):  # NoPE every 4th layer (full, temperature-tuned), the others chunked
        assert llama4.nope_layers == list(range(3, 48, 4)) and llama4.attention_chunk_size == 8192
        assert [llama4.layer_type(i) for i in (0, 3)] == ["chunked_attention", "full_attention"]
        assert llama4.attention_temperature_scale == 0.1
    assert (scout.qk_norm, scout.qk_norm_weight, scout.qk_norm_skip_nope, maverick.qk_norm) == ("head", False, True, None)
    assert gpt.layer_types == ["sliding_attention", "full_attention"] * 18 and gpt.sliding_window == 128
    assert MoEConfig.from_preset("gpt-oss-20b").layer_types == ["sliding_attention", "full_attention"] * 12
    dbrx = MoEConfig.from_preset("dbrx")
    assert (dbrx.norm_type, dbrx.norm_bias, dbrx.clip_qkv) == ("layer_norm", False, 8.0)
    assert MoEConfig.from_preset("ernie-4.5-21b-a3b").norm_topk_min == 1e-12


def test_from_preset_overrides() -> None:
    config = MoEConfig.from_preset("deepseek-v3", num_hidden_layers=4, n_routed_experts=16, num_nextn_predict_layers=0)
    assert (config.num_hidden_layers, config.n_routed_experts, config.num_nextn_predict_layers) == (4, 16, 0)
    assert config.hidden_size == 7168 and config.topk_group == 4  # the rest stays the preset's
    assert PRESETS["deepseek-v3"]["num_hidden_layers"] == 61  # the table itself is not modified
    nested = MoEConfig.from_preset("deepseek-v3")
    nested.rope_parameters["factor"] = 1.0
    assert PRESETS["deepseek-v3"]["rope_parameters"]["factor"] == 40.0  # deep-copied
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok="):
        MoEConfig.from_preset("mixtral-8x7b", num_experts_per_tok=9)


def test_unknown_preset_name() -> None:
    with pytest.raises(ValueError, match="Unknown preset name='deepseek-v4'.*deepseek-v3"):
        MoEConfig.from_preset("deepseek-v4")
