"""The FFN, router and MoE-block variants of families beyond DeepSeek, each against its formula (and
transformers' own function where one exists), and the fast paths stepping aside for what they do not implement:
FFN and expert biases, the gated units (GeGLU, clamped SwiGLU, gpt-oss's), router bias, p-norm and floored
renormalisation, SparseMixer, the gate on the expert input, dense layers after the MoE ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.phimoe.modeling_phimoe import sparsemixer as phimoe_sparsemixer

from hf_moe.kernels.experts.backends import choose_backend
from hf_moe.kernels.experts.fused import supports_fused
from hf_moe.modeling.configuration import ConfigFieldError
from hf_moe.modeling.experts import MLP, RoutedExperts, gated_unit
from hf_moe.modeling.moe import MoEBlock
from hf_moe.modeling.routing import Router, sparsemixer
from tests.conftest import tiny_gqa_config

E, H, I, T = 4, 8, 8, 9  # noqa: E741 - experts, hidden, intermediate, tokens


def _config(**overrides: object):  # noqa: ANN202 - MoEConfig
    fields = dict(n_routed_experts=E, num_experts_per_tok=2, hidden_size=H, moe_intermediate_size=I,
                  n_shared_experts=0, router_bias_update_rate=0.0)  # fmt: skip
    return tiny_gqa_config(**{**fields, **overrides})


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module


# ----------------------------------------------------------------------------------------- gated units
def test_gated_units() -> None:
    gate, up = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    assert torch.equal(gated_unit(_config())(gate, up), F.silu(gate) * up)
    assert torch.equal(gated_unit(_config(hidden_act="gelu"))(gate, up), F.gelu(gate) * up)  # GeGLU
    clamped = gated_unit(_config(glu_limit=1.5))(gate, up)
    assert torch.equal(clamped, F.silu(gate.clamp(max=1.5)) * up.clamp(-1.5, 1.5))
    g, u = gate.clamp(max=2.0), up.clamp(-2.0, 2.0)
    gpt = gated_unit(_config(glu_type="gpt_oss", glu_limit=2.0, glu_alpha=1.702))(gate, up)
    assert torch.equal(gpt, g * torch.sigmoid(1.702 * g) * (u + 1))


def test_mlp_biases_and_variants_bypass_the_swiglu_kernel() -> None:
    x = torch.randn(3, H, requires_grad=True)  # fp32 CPU with grad: where the "swiglu" kernel would run
    for config in (_config(mlp_bias=True), _config(glu_limit=0.5), _config(hidden_act="gelu")):
        mlp = _randomise(MLP(config, I))
        assert not mlp.fused
        expected = mlp.down_proj(gated_unit(config)(mlp.gate_proj(x), mlp.up_proj(x)))
        assert torch.equal(mlp(x), expected)
    assert MLP(_config(mlp_bias=True), I).gate_proj.bias is not None
    assert MLP(_config(), I).fused and MLP(_config(), I).gate_proj.bias is None


# ----------------------------------------------------------------------------------------- experts
def _experts(**overrides: object) -> RoutedExperts:
    config = _config(**overrides)
    config._experts_implementation = "eager"
    return _randomise(RoutedExperts(config))


def _loop(experts: RoutedExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(H)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = experts.gate_up_proj[e] @ x[t] + experts.gate_up_proj_bias[e]
            hidden = experts.unit(gate_up[:I], gate_up[I:])
            y = y + weights[t, k] * (experts.down_proj[e] @ hidden + experts.down_proj_bias[e])
        rows.append(y)
    return torch.stack(rows)


def _routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    return x, ids, torch.rand(T, 2, generator=gen)


@pytest.mark.parametrize("variant", [dict(expert_bias=True),
                                     dict(expert_bias=True, glu_type="gpt_oss", glu_limit=0.7)])  # fmt: skip
def test_biased_experts_equal_a_loop_on_every_backend(variant: dict) -> None:
    experts = _experts(**variant)
    assert experts.has_bias and not supports_fused(experts)  # the fused kernels step aside
    x, ids, weights = _routing()
    expected = _loop(experts, x, ids, weights)
    torch.testing.assert_close(experts(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
    for implementation in ("grouped_mm", "batched_mm", "hf_moe_auto"):  # transformers' read has_bias, _apply_gate
        experts.config._experts_implementation = implementation
        torch.testing.assert_close(experts(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
    assert choose_backend(experts, x, "training") in ("grouped_mm", "eager")


def test_unbiased_experts_keep_the_fused_path() -> None:
    experts = _experts()
    assert not experts.has_bias and experts.gate_up_proj_bias is None and supports_fused(experts)
    assert not supports_fused(_experts(glu_limit=1.0)) and not supports_fused(_experts(hidden_act="gelu"))


# ----------------------------------------------------------------------------------------- router
def _router(**overrides: object) -> Router:
    return _randomise(Router(_config(**overrides))).eval()


def test_router_bias_is_added_to_the_logits() -> None:
    router = _router(router_bias=True, topk_before_softmax=True)
    x = torch.randn(T, H)
    out = router(x)
    logits = x @ router.weight.t() + router.bias
    torch.testing.assert_close(out.logits, logits)
    top = logits.topk(2, dim=-1)
    assert torch.equal(out.topk_ids, top.indices)
    torch.testing.assert_close(out.topk_weights, top.values.softmax(dim=-1))


def test_p_norm_and_floored_renormalisation() -> None:
    x = torch.randn(T, H)
    router = _router(norm_topk_p=2.0)
    out = router(x)
    chosen = F.linear(x, router.weight).softmax(dim=-1).gather(1, out.topk_ids)
    torch.testing.assert_close(out.topk_weights, chosen / chosen.norm(p=2, dim=-1, keepdim=True))
    floored = _router(norm_topk_min=0.9)(x)  # softmax top-2 sums stay below 0.9 for 4 experts at times
    sums = chosen.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(floored.topk_weights, chosen / sums.clamp(min=0.9))
    assert (sums < 0.9).any()


def test_sparsemixer_equals_phimoe() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 8, generator=gen)
    logits[:8, 1] = logits[:8, 0] * 0.99  # near-ties: several candidates
    for eps in (0.01, 0.3):
        theirs_gates, theirs_ids = phimoe_sparsemixer(logits.clone(), jitter_eps=eps, training=False)
        ids, gates = sparsemixer(logits, eps)
        assert torch.equal(ids, theirs_ids)
        assert torch.equal(gates, theirs_gates)
    router = _router(topk_method="sparsemixer", norm_topk_prob=False, sparsemixer_eps=0.3)
    x = torch.randn(T, H)
    ids, gates = sparsemixer(F.linear(x, router.weight), 0.3)
    out = router(x)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, gates)


def test_sparsemixer_config_rules() -> None:
    with pytest.raises(ConfigFieldError, match="num_experts_per_tok"):
        _config(topk_method="sparsemixer", norm_topk_prob=False, num_experts_per_tok=3)
    with pytest.raises(ConfigFieldError, match="norm_topk_prob"):
        _config(topk_method="sparsemixer", norm_topk_prob=True)


# ----------------------------------------------------------------------------------------- MoE block
def test_gate_on_expert_input() -> None:
    config = _config(gate_on_expert_input=True, scoring_func="sigmoid", norm_topk_prob=False)
    config._experts_implementation = "eager"
    block = _randomise(MoEBlock(config)).eval()
    x = torch.randn(1, T, H)
    out, routing = block(x)
    expected = torch.zeros(T, H)
    for t in range(T):
        for k in range(2):
            e, g = int(routing.topk_ids[t, k]), routing.topk_weights[t, k]
            gate_up = block.experts.gate_up_proj[e] @ (g * x[0, t])
            expected[t] += block.experts.down_proj[e] @ (F.silu(gate_up[:I]) * gate_up[I:])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    config.gate_on_expert_input = False  # the output-gated block differs (the FFN is not linear)
    assert not torch.allclose(block(x)[0][0], expected, atol=1e-4)


def test_last_k_dense_replace_and_variant_rules() -> None:
    config = _config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2, last_k_dense_replace=2)
    assert config.moe_layer_indices == [1, 3]
    with pytest.raises(ConfigFieldError, match="last_k_dense_replace"):
        _config(num_hidden_layers=3, first_k_dense_replace=2, last_k_dense_replace=2)
    with pytest.raises(ConfigFieldError, match="glu_limit"):
        _config(glu_type="gpt_oss")
    with pytest.raises(ConfigFieldError, match="glu_type"):
        _config(glu_type="reglu")
    with pytest.raises(ConfigFieldError, match="norm_type"):
        _config(norm_type="batch_norm")


def test_moe_output_bias_and_moa_rules() -> None:
    config = _config(moe_output_bias=True)
    config._experts_implementation = "eager"
    block = _randomise(MoEBlock(config)).eval()
    x = torch.randn(1, T, H)
    out, _ = block(x)
    bias = block.bias.detach().clone()
    with torch.no_grad():
        block.bias.zero_()
    torch.testing.assert_close(out, block(x)[0] + bias)
    assert MoEBlock(_config()).bias is None
    with pytest.raises(ConfigFieldError, match="num_attention_heads"):
        _config(moa_experts=4, moa_top_k=2, num_attention_heads=4, num_key_value_heads=1, qk_norm=None)
    with pytest.raises(ConfigFieldError, match="moa_top_k"):
        _config(moa_experts=2, moa_top_k=3, num_attention_heads=6, num_key_value_heads=2, qk_norm=None)
    with pytest.raises(ConfigFieldError, match="moa_experts"):
        _config(moa_experts=4, moa_top_k=2, num_attention_heads=4, num_key_value_heads=2, qk_norm="head")
    _config(moa_experts=4, moa_top_k=2, num_attention_heads=4, num_key_value_heads=2, qk_norm=None)  # valid


def test_sparsemixer_training_equals_phimoe_forward_and_gradients() -> None:
    """Seeded, the sampled choices, the Heun-scaled gates and the gradient to the logits are Phi-3.5-MoE's."""
    logits = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
    logits[:64, 1] = logits[:64, 0] * 0.95  # near-ties: sampling has a choice
    upstream = torch.randn(256, 2, generator=torch.Generator().manual_seed(8))
    results = []
    for run in (phimoe_sparsemixer, None):
        x = logits.clone().requires_grad_()
        torch.manual_seed(11)
        if run is None:
            ids, gates = sparsemixer(x, 0.3, training=True)
        else:
            gates, ids = run(x, jitter_eps=0.3, training=True)
        (grad,) = torch.autograd.grad(gates, x, upstream)
        results.append((ids, gates.detach(), grad))
    (their_ids, their_gates, their_grad), (ids, gates, grad) = results
    assert torch.equal(ids, their_ids) and torch.equal(gates, their_gates) and torch.equal(grad, their_grad)
    assert not torch.equal(ids, sparsemixer(logits, 0.3)[0])  # sampling chose differently somewhere
