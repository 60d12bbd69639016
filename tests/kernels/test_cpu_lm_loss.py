"""The LM-loss kernels equal transformers' ForCausalLMLoss: "lm_head_loss" (`LinearCrossEntropyFunction`, head and
loss in one) in a model's training forward, "causal_lm_loss" (`CrossEntropyFunction`) on logits, chunked; any
upstream gradient scale; a batch without targets."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_moe import MoEForCausalLM
from hf_moe.kernels.cpu import lm_loss as cross_entropy
from hf_moe.kernels.cpu.lm_loss import causal_lm_loss
from tests.conftest import tiny_config
from tests.kernels.helpers import spy_calls


def loss_and_grads(model: MoEForCausalLM, ids: torch.Tensor, labels: torch.Tensor,
                   **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kwargs)
    (out.loss + 0.1 * out.logits.square().mean()).backward()  # a second use of the logits adds its gradient
    return out.lm_loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 55])
def test_lm_head_loss_equals_transformers(num_items: int | None, cpu_gemm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, cross_entropy.LinearCrossEntropyFunction, "apply")
    model = MoEForCausalLM(tiny_config(num_hidden_layers=2)).train()
    ids = torch.randint(3, 97, (3, 21))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ours = loss_and_grads(model, ids, labels, **kwargs)
    assert len(calls) == 1
    model.loss_function = ForCausalLMLoss  # a user-set loss is used as is: here transformers' own
    theirs = loss_and_grads(model, ids, labels, **kwargs)
    assert len(calls) == 1
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    if cpu_gemm == "aten":  # the same product as the module's: the very same logits
        assert torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    for name, grad in theirs[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_causal_lm_loss_equals_transformers(grad_enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The logits-input loss (MTP heads, logits_to_keep, GPUs): chunked like the fused one, several chunks here."""
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 4 * 50)
    logits = torch.randn(2, 13, 50, requires_grad=grad_enabled)
    labels = torch.randint(0, 50, (2, 13))
    labels[0, 3:6] = -100
    with torch.set_grad_enabled(grad_enabled):
        ours, theirs = causal_lm_loss(logits, labels, 50), ForCausalLMLoss(logits, labels, 50)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    if grad_enabled:
        a, = torch.autograd.grad(ours, logits)
        b, = torch.autograd.grad(theirs, logits)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factor", [2.0, -3.0, 0.0])
def test_lm_head_and_loss_gradient_for_any_upstream_scale(factor: float) -> None:
    """The upstream gradient is folded into the exponent when it is >= 0; negative ones take the plain path."""
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, :3] = -100
    loss, logits = cross_entropy.lm_head_and_loss(hidden, weight, labels)
    ours = torch.autograd.grad(loss * factor, (hidden, weight))
    reference_loss = ForCausalLMLoss(hidden @ weight.t(), labels, 40)
    theirs = torch.autograd.grad(reference_loss * factor, (hidden, weight))
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_batch_without_targets_gives_transformers_nan_loss_and_no_nan_gradients() -> None:
    """No label counts (e.g. a one-token batch): the mean is 0/0 = NaN as in transformers, but no gradient is."""
    model = MoEForCausalLM(tiny_config(num_hidden_layers=2)).train()
    ids = torch.randint(3, 97, (2, 6))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    reference = ForCausalLMLoss(out.logits.detach(), torch.full_like(ids, -100), 97)
    assert torch.isnan(out.lm_loss) and torch.isnan(reference)
    out.lm_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.lm_head.weight.grad.abs().sum() == 0
