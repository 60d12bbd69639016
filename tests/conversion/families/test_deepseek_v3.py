"""DeepSeek-V3 record: its oracle cases (q-LoRA with YaRN RoPE, no q-LoRA with a tied head) and its MTP modules,
which live on disk as `model.layers.{N+k}.*`."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, MixtralConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_from_moe, state_dict_to_moe
from tests.conversion.families.oracle import (
    MLA,
    TINY,
    TOL,
    Case,
    family_model,
    ours_from,
    randomise,
    released_mtp_checkpoint,
)
from tests.conversion.families.test_mixtral import CASES as MIXTRAL

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # fmt: skip
CASES = {
    "deepseek_v3_qlora_yarn": Case(DeepseekV3Config, dict(
        TINY, **MLA, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=0, rope_parameters=YARN,
        attention_bias=True), True),
    "deepseek_v3_no_qlora": Case(DeepseekV3Config, dict(
        TINY, **MLA, q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=2,
        routed_scaling_factor=1.5, norm_topk_prob=False, num_mtp_layers=0, rope_interleave=False,
        tie_word_embeddings=True), False),
}  # fmt: skip


def test_family_specific_fields() -> None:
    v3 = config_to_moe(CASES["deepseek_v3_qlora_yarn"].config())
    assert (v3.attention_type, v3.scoring_func, v3.topk_method) == ("mla", "sigmoid", "noaux_tc")
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor, v3.attention_out_bias) == (4, 2, 2.5, True)
    assert v3.router_bias_update_rate > 0
    released = DeepseekV3Config(**CASES["deepseek_v3_no_qlora"].fields, aux_loss_alpha=0.001, seq_aux=True)
    assert config_to_moe(released).seq_aux_loss_alpha == 0.001  # extra fields of DeepSeek's config.json


def test_export_refuses_what_the_family_cannot_express() -> None:
    moe = config_to_moe(MixtralConfig(**MIXTRAL["mixtral"].fields))
    with pytest.raises(ValueError, match="attention_type"):
        config_from_moe(moe, "deepseek_v3")


def mtp_case() -> tuple[torch.nn.Module, DeepseekV3Config, dict[str, torch.Tensor]]:
    """A DeepSeek-V3 model plus an on-disk MTP module at layer N, written by hand in the released layout."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    fields = dict(CASES["deepseek_v3_qlora_yarn"].fields, num_mtp_layers=0)
    theirs, config = family_model(CASES["deepseek_v3_qlora_yarn"])
    n = config.num_hidden_layers
    torch.manual_seed(2)
    layer = DeepseekV3DecoderLayer(config, layer_idx=n)
    randomise(layer)
    disk = released_mtp_checkpoint(theirs, layer, n)
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
