"""Every hf_moe experts backend equals the eager reference (forward and backward) on random inputs and edge cases,
with its products on torch.mm and on oneDNN (the `cpu_gemm` fixture), is reachable by name through transformers'
experts interface, and `hf_moe_auto` logs its choice."""

from __future__ import annotations

import logging

import pytest
import torch

import hf_moe.kernels  # noqa: F401  registers the backends
from hf_moe import MoEForCausalLM
from hf_moe.kernels.experts.backends import BACKENDS, choose_backend
from hf_moe.kernels.experts.fused import SlotPlan, padded_count
from hf_moe.modeling.experts import RoutedExperts
from tests.conftest import tiny_config

CPU_BACKENDS = ["hf_moe_fused", "hf_moe_grouped_mm", "hf_moe_auto"]


def make_experts(num_experts: int = 6, hidden: int = 24, inter: int = 12, dtype: torch.dtype = torch.float32,
                 implementation: str = "eager") -> RoutedExperts:
    config = tiny_config(n_routed_experts=num_experts, hidden_size=hidden, moe_intermediate_size=inter,
                         n_group=1, topk_group=1)
    config._experts_implementation = implementation
    experts = RoutedExperts(config).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


def random_routing(tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])  # distinct per token
    return ids, torch.rand(tokens, top_k)


def run(experts: RoutedExperts, implementation: str, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        grad: torch.Tensor | None) -> list[torch.Tensor]:
    """Output and gradients (x, gate_up_proj, down_proj, weights) under one implementation."""
    experts.config._experts_implementation = implementation
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(x, ids, weights)
    (out.sum() if grad is None else out).backward(None if grad is None else grad)
    return [out.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, weights.grad]


def assert_matches_eager(experts: RoutedExperts, implementation: str, x: torch.Tensor, ids: torch.Tensor,
                         weights: torch.Tensor, grad: torch.Tensor | None = None, tol: float = 1e-5) -> None:
    names = ["output", "grad x", "grad gate_up_proj", "grad down_proj", "grad weights"]
    reference = run(experts, "eager", x, ids, weights, grad)
    result = run(experts, implementation, x, ids, weights, grad)
    for name, got, want in zip(names, result, reference):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, n=name: f"{implementation} {n}: {m}")


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_random_inputs_match_eager(implementation: str) -> None:
    experts = make_experts()
    ids, weights = random_routing(37, 6, 3)
    x = torch.randn(37, 24)
    assert_matches_eager(experts, implementation, x, ids, weights, grad=torch.randn(37, 24))


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_empty_experts_get_zero_gradients(implementation: str) -> None:
    experts = make_experts()
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 5]])  # experts 1, 3, 4 unused
    weights = torch.rand(4, 2)
    assert_matches_eager(experts, implementation, torch.randn(4, 24), ids, weights, grad=torch.randn(4, 24))
    grads = run(experts, implementation, torch.randn(4, 24), ids, weights, None)
    assert grads[2][[1, 3, 4]].abs().sum() == 0 and grads[3][[1, 3, 4]].abs().sum() == 0


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_single_token(implementation: str) -> None:
    experts = make_experts()
    ids, weights = random_routing(1, 6, 2)
    assert_matches_eager(experts, implementation, torch.randn(1, 24), ids, weights, grad=torch.randn(1, 24))


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_all_tokens_on_one_expert(implementation: str) -> None:
    experts = make_experts()
    ids = torch.zeros(16, 1, dtype=torch.long)
    assert_matches_eager(experts, implementation, torch.randn(16, 24), ids, torch.rand(16, 1),
                         grad=torch.randn(16, 24))


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_non_contiguous_output_gradients(implementation: str) -> None:
    experts = make_experts()
    ids, weights = random_routing(9, 6, 2)
    x = torch.randn(9, 24)
    assert_matches_eager(experts, implementation, x, ids, weights, grad=None)  # out.sum(): expanded, stride 0
    transposed = torch.randn(24, 9).t()  # strides (1, 9)
    assert not transposed.is_contiguous()
    assert_matches_eager(experts, implementation, x, ids, weights, grad=transposed)


@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_bf16_close_to_eager(implementation: str) -> None:
    experts = make_experts(dtype=torch.bfloat16)
    ids, weights = random_routing(8, 6, 2)
    x = torch.randn(8, 24, dtype=torch.bfloat16)
    reference = run(experts, "eager", x, ids, weights.bfloat16(), torch.ones(8, 24, dtype=torch.bfloat16))
    result = run(experts, implementation, x, ids, weights.bfloat16(), torch.ones(8, 24, dtype=torch.bfloat16))
    for got, want in zip(result, reference):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2 * want.float().abs().max().item())


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_only_requested_gradients(implementation: str) -> None:
    """Frozen experts (recipes freeze them) and an inference forward under no_grad both work."""
    experts = make_experts()
    experts.requires_grad_(False)
    ids, weights = random_routing(5, 6, 2)
    x = torch.randn(5, 24, requires_grad=True)
    experts.config._experts_implementation = implementation
    experts(x, ids, weights).sum().backward()
    experts.config._experts_implementation = "eager"
    x_ref = x.detach().clone().requires_grad_()
    experts(x_ref, ids, weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        experts.config._experts_implementation = implementation
        out = experts(x, ids, weights)
    assert out.grad_fn is None


@pytest.mark.usefixtures("cpu_gemm")
@pytest.mark.parametrize("implementation", ["hf_moe_fused", "hf_moe_auto"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_model_training_step_matches_eager(implementation: str, capacity_factor: float | None) -> None:
    """Whole model, dropless and with capacity dropping: loss and every parameter gradient equal eager's."""
    config = tiny_config(capacity_factor=capacity_factor)
    model = MoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 11))
    results = {}
    for name in ("eager", implementation):
        model.set_experts_implementation(name)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results[implementation][0], results["eager"][0], rtol=1e-6, atol=1e-6)
    assert results[implementation][1].keys() == results["eager"][1].keys()
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results[implementation][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_backend_switch_takes_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """set_experts_implementation really routes RoutedExperts through our function (transformers' eligibility
    check reads module source; a silent fall back to eager would pass every parity test)."""
    calls = []
    original = BACKENDS["hf_moe_fused"]

    def spy(*args: object) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "hf_moe_fused", spy)
    model = MoEForCausalLM(tiny_config())
    model.set_experts_implementation("hf_moe_fused")
    model(torch.randint(3, 97, (1, 5)))
    assert len(calls) == 2  # two MoE layers (the first layer is dense)


def test_default_and_auto_resolve_to_hf_moe_auto() -> None:
    model = MoEForCausalLM(tiny_config())
    assert model.config._experts_implementation == "hf_moe_auto"
    model.set_experts_implementation("eager")
    model.set_experts_implementation("auto")
    assert model.config._experts_implementation == "hf_moe_auto"


def test_auto_logs_choice_once(caplog: pytest.LogCaptureFixture) -> None:
    from hf_moe.kernels.experts import backends

    backends._logged_choices.clear()
    experts = make_experts(implementation="hf_moe_auto")
    ids, weights = random_routing(3, 6, 2)
    with caplog.at_level(logging.INFO, logger="hf_moe.kernels.experts.backends"):
        with torch.no_grad():
            experts(torch.randn(3, 24), ids, weights)
            experts(torch.randn(3, 24), ids, weights)
    messages = [r.getMessage() for r in caplog.records if "hf_moe_auto" in r.getMessage()]
    assert len(messages) == 1 and "hf_moe_fused" in messages[0] and "phase=decode" in messages[0]


def test_auto_choices_per_phase_on_cpu() -> None:
    experts = make_experts()
    x = torch.randn(4, 24)
    for phase in ("training", "prefill", "decode"):
        assert choose_backend(experts, x, phase) == "hf_moe_fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the eligibility rule: the experts' own eager forward
        assert choose_backend(experts, x, "training") == "eager"
    assert choose_backend(experts.to(torch.bfloat16), x.bfloat16(), "training") == "eager"
    experts = make_experts()  # (fp32 again: `.to` above converted it in place)
    experts.config.hidden_act = "gelu"  # a layout our kernels do not cover: transformers' grouped_mm
    assert choose_backend(experts, x, "training") == "grouped_mm"
    unaligned = make_experts(hidden=10, inter=6)  # rows of 40 and 24 bytes: torch's CPU grouped GEMM refuses them
    unaligned.config.hidden_act = "gelu"
    assert choose_backend(unaligned, torch.randn(4, 10), "training") == "eager"
    ids, weights = random_routing(4, 4, 2)
    out = BACKENDS["hf_moe_auto"](unaligned, torch.randn(4, 10), ids, weights)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_auto_runs_the_eager_reference_where_the_fused_kernel_is_not_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = make_experts(dtype=torch.bfloat16)
    ids, weights = random_routing(8, 6, 2)
    x = torch.randn(8, 24, dtype=torch.bfloat16)
    fused = []
    monkeypatch.setitem(BACKENDS, "hf_moe_fused", lambda *args: fused.append(1))
    reference = run(experts, "eager", x, ids, weights.bfloat16(), torch.ones(8, 24, dtype=torch.bfloat16))
    result = run(experts, "hf_moe_auto", x, ids, weights.bfloat16(), torch.ones(8, 24, dtype=torch.bfloat16))
    assert fused == []
    for got, want in zip(result, reference):
        assert torch.equal(got, want)


def test_named_backends_that_cannot_run_raise() -> None:
    experts = make_experts()
    ids, weights = random_routing(3, 6, 2)
    x = torch.randn(3, 24)
    with pytest.raises((ImportError, RuntimeError)):
        BACKENDS["hf_moe_hub"](experts, x, ids, weights)  # needs the kernels package and a CUDA GPU
    experts.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hf_moe_fused"):
        BACKENDS["hf_moe_fused"](experts, x, ids, weights)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed (extra: triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    experts = make_experts()
    ids, weights = random_routing(3, 6, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        BACKENDS["hf_moe_triton"](experts, torch.randn(3, 24), ids, weights)


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_decode_forward_matches_eager(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd, up to FEW_SLOTS token-slots take the slot-by-slot path (T=3, K=3 does not): the same
    output as eager, also with a slot dropped (weight 0) and an expert chosen by two tokens."""
    from hf_moe.kernels.experts import fused

    calls = []
    original = fused._few_slots_forward
    monkeypatch.setattr(fused, "_few_slots_forward", lambda *a: calls.append(1) or original(*a))
    experts = make_experts()
    ids = torch.tensor([[4, 1, 0], [1, 5, 2], [3, 1, 2]])[:tokens]
    weights = torch.rand(tokens, 3)
    weights[0, 1] = 0.0
    x = torch.randn(tokens, 24)
    with torch.inference_mode():
        reference = experts(x, ids, weights)
        experts.config._experts_implementation = "hf_moe_fused"
        result = experts(x, ids, weights)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6)
    assert len(calls) == (1 if tokens * 3 <= fused.FEW_SLOTS else 0)


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 100, 128, 129, 300, 1000, 4097])
def test_padded_counts_are_few_and_close(count: int) -> None:
    padded = padded_count(count)
    assert padded >= count and padded - count <= max(7, count // 16)
    assert padded % 8 == 0


def test_padded_plan_rows() -> None:
    """Each expert's segment starts where the padded ones before it end; pad rows read token 0; sorted slots map
    to their rows and back."""
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 5], [5, 0]])  # counts 4, 0, 4, 0, 0, 2
    plan = SlotPlan.build(ids, 6, pad=True)
    assert plan.bucketed and plan.segments == [(0, 0, 8), (2, 8, 8), (5, 16, 8)]
    assert plan.num_rows == 24 and plan.rows.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17]
    assert sorted(plan.pad_rows.tolist()) == sorted(set(range(24)) - set(plan.rows.tolist()))
    assert torch.equal(plan.row_tokens[plan.rows], plan.tokens) and plan.row_tokens[plan.pad_rows].eq(0).all()
    values = torch.arange(10.0)
    assert torch.equal(plan.from_rows(plan.to_rows(values)), values)
    assert plan.to_rows(values)[plan.pad_rows].eq(0).all()
    unpadded = SlotPlan.build(ids, 6)
    assert not unpadded.bucketed and unpadded.segments == [(0, 0, 4), (2, 4, 4), (5, 8, 2)]


@pytest.mark.usefixtures("cpu_gemm")
def test_pad_rows_keep_other_tokens_gradients_finite() -> None:
    """Pad rows read token 0's rows and are zeroed: an infinite gradient on token 0 reaches only the experts
    token 0 uses, as in eager (a pad row left unzeroed would spread 0 * inf = NaN into every expert's weights)."""
    experts = make_experts()
    ids = torch.tensor([[1, 2]] + [[3, 4]] * 5 + [[4, 5]] * 3)
    grad = torch.randn(9, 24)
    grad[0] = float("inf")
    grads = {}
    for implementation in ("eager", "hf_moe_fused"):
        grads[implementation] = run(experts, implementation, torch.randn(9, 24), ids, torch.rand(9, 2), grad)
    for implementation, (_, _, grad_gate_up, grad_down, _) in grads.items():
        assert torch.isfinite(grad_gate_up[[0, 3, 4, 5]]).all() and torch.isfinite(grad_down[[0, 3, 4, 5]]).all()
        assert not torch.isfinite(grad_down[1]).all(), implementation


@pytest.mark.usefixtures("cpu_gemm")
def test_pad_rows_are_never_added_into_a_token() -> None:
    """0 @ W is NaN where an expert's weights are not finite: the pad rows of that expert's segment must not be
    added into token 0 (which pad rows read), whose output and input gradient stay as eager's."""
    experts = make_experts()
    with torch.no_grad():
        experts.down_proj[5, 0, 0] = float("inf")
        experts.gate_up_proj[4, 0, 0] = float("nan")
    ids = torch.tensor([[1, 2]] + [[3, 5]] * 4 + [[4, 3]] * 2)  # token 0 uses neither expert 4 nor 5
    x = torch.randn(7, 24)
    for implementation in ("eager", "hf_moe_fused"):
        out, grad_x, *_ = run(experts, implementation, x, ids, torch.rand(7, 2), torch.randn(7, 24))
        assert torch.isfinite(out[0]).all() and torch.isfinite(grad_x[0]).all(), implementation


def test_small_experts_are_not_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding is for oneDNN's kernel cache: where no expert product is large enough for oneDNN, none is made."""
    from hf_moe.kernels.cpu import gemm

    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    pads: list[bool] = []
    real_build = SlotPlan.build.__func__

    def spy(cls: type, top_k_index: torch.Tensor, num_experts: int, pad: bool = False) -> SlotPlan:
        pads.append(pad)
        return real_build(cls, top_k_index, num_experts, pad)

    monkeypatch.setattr(SlotPlan, "build", classmethod(spy))
    experts = make_experts()
    ids, weights = random_routing(37, 6, 3)
    with gemm.cpu_gemm_override("onednn"):
        run(experts, "hf_moe_fused", torch.randn(37, 24), ids, weights, None)  # 18 rows x 24 x 12 per expert
        monkeypatch.setattr(gemm, "MIN_MACS_BUCKETED", 18 * 24 * 12)
        run(experts, "hf_moe_fused", torch.randn(37, 24), ids, weights, None)
    assert pads == [False, True]
