"""The layout ops of the newer families (interleaved RoPE pairs, (1, N) biases, transposed and interleaved
experts, flat experts, DBRX's fused qkv as export Pieces) and the variant refusals every record inherits."""

from __future__ import annotations

import pytest
import torch

from hf_moe.conversion.families import MOE_FAMILIES, config_from_moe, config_to_moe, get_family
from hf_moe.conversion.records import VARIANT_DEFAULTS, MoEFamily
from hf_moe.conversion.tables import OPS, Binding, Piece, StateDictConverter
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.oracle import cases

E, I, H, D = 3, 4, 6, 8  # noqa: E741 - experts, expert width, hidden, head_dim


def _binding(op: str, parts: int = 1) -> Binding:
    return Binding("fam", "ours", tuple(f"theirs.{j}" for j in range(parts)), op, None, D, (2 * D, D), E)


@pytest.mark.parametrize(("op", "shapes"), [
    ("rope_pairs", [(2 * D, H)]), ("rope_pairs", [(2 * D,)]), ("squeeze0", [(1, E)]), ("transpose", [(E, H, I)]),
    ("interleave_t", [(E, H, 2 * I)]), ("interleave", [(E, 2 * I)]), ("flat_stack_cat", [(E * I, H), (E * I, H)]),
    ("flat_transpose", [(E * I, H)]),
])  # fmt: skip
def test_layout_ops_invert_each_other(op: str, shapes: list[tuple[int, ...]]) -> None:
    binding, spec = _binding(op, len(shapes)), OPS[op]
    parts = [torch.randn(shape) for shape in shapes]
    made = spec.to_moe(binding, parts)
    back = spec.from_moe(binding, made)
    assert all(torch.equal(a, b) for a, b in zip(back, parts, strict=True))
    assert spec.part_shape(tuple(made.shape)) == shapes[0]


def test_layout_ops_place_what_they_say() -> None:
    q = torch.arange(2 * D, dtype=torch.float32)  # two heads of D rows
    assert OPS["rope_pairs"].to_moe(_binding("rope_pairs"), [q])[:D].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    fused = torch.randn(E, H, 2 * I)  # gpt-oss: gate and up columns interleaved
    ours = OPS["interleave_t"].to_moe(_binding("interleave_t"), [fused])
    assert torch.equal(ours[:, :I], fused[..., 0::2].transpose(1, 2))
    assert torch.equal(ours[:, I:], fused[..., 1::2].transpose(1, 2))


def test_fused_qkv_rows_and_pieces() -> None:
    wqkv = torch.randn(4 * D, H)  # q: 2D rows, k and v: D rows each
    q, k, v = (OPS[f"qkv_{p}"].to_moe(_binding(f"qkv_{p}"), [wqkv]) for p in "qkv")
    assert torch.equal(torch.cat((q, k, v)), wqkv) and q.shape == (2 * D, H)
    pieces = [OPS[f"qkv_{p}"].from_moe(_binding(f"qkv_{p}"), t)[0] for p, t in zip("qkv", (q, k, v))]
    assert all(isinstance(p, Piece) for p in pieces) and [p.index for p in pieces] == [0, 1, 2]


@pytest.mark.parametrize("names", [("halves_0", "halves_1"), ("kv_k", "kv_v")])
def test_fused_halves_split_and_pieces(names: tuple[str, str]) -> None:
    """One (2R, H) tensor <-> its first and second R rows (Granite's shared input_linear, JetMoE's kv_proj); the
    part shape a source check expects is the fused one."""
    fused = torch.randn(6, H)
    first, second = (OPS[n].to_moe(_binding(n), [fused]) for n in names)
    assert torch.equal(first, fused[:3]) and torch.equal(second, fused[3:])
    pieces = [OPS[n].from_moe(_binding(n), t)[0] for n, t in zip(names, (first, second))]
    assert [(p.index, p.of) for p in pieces] == [(0, 2), (1, 2)]
    assert torch.equal(torch.cat([p.tensor for p in pieces]), fused)
    assert OPS[names[0]].part_shape((3, H)) == (6, H)


def test_export_waits_for_every_piece_and_names_a_missing_one() -> None:
    case = cases(MoEFamily)["dbrx"]
    moe = config_to_moe(case.config())
    converter = StateDictConverter(get_family("dbrx"), moe, "from_moe")
    prefix = "model.layers.0.self_attn."
    assert converter.push(prefix + "q_proj.weight", torch.randn(64, 64)) == []
    assert converter.push(prefix + "k_proj.weight", torch.randn(32, 64)) == []
    with pytest.raises(ValueError, match="Wqkv.weight lacks row blocks"):
        converter.finish()


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_record_refuses_the_variants_it_lacks(family: str) -> None:
    record = get_family(family)
    case = next(c for c in cases(MoEFamily).values() if c.family == family)
    moe = config_to_moe(case.config())
    others = {"mlp_bias": True, "expert_bias": True, "router_bias": True, "lm_head_bias": True, "glu_type": "gpt_oss",
              "glu_limit": 3.0, "norm_type": "layer_norm", "norm_topk_p": 2.0, "norm_topk_min": 0.5,
              "gate_on_expert_input": True, "last_k_dense_replace": 1, "attention_sinks": True, "moe_output_bias": True,
              "moa_experts": 8}  # fmt: skip
    assert set(others) == set(VARIANT_DEFAULTS)
    for field, value in others.items():
        if field in record.variants or getattr(moe, field) == value:
            continue
        changes = {field: value, **({"glu_limit": 3.0} if field == "glu_type" else {})}
        if field == "last_k_dense_replace" and moe.first_k_dense_replace + 1 > moe.num_hidden_layers:
            continue
        if field in ("moa_experts", "attention_sinks") and (moe.attention_type != "gqa" or moe.moa_experts):
            continue  # not a valid configuration at all
        if field == "moa_experts":  # a valid MoA: num_attention_heads = moa_top_k * num_key_value_heads
            changes["moa_top_k"] = moe.num_attention_heads // moe.num_key_value_heads
            if changes["moa_top_k"] > 8 or moe.qk_norm or moe.clip_qkv or moe.sliding_window or moe.attention_sinks:
                continue
        with pytest.raises(ValueError, match=field):
            config_from_moe(MoEConfig(**{**moe.to_dict(), **changes}), family)
