"""RMSNorm, the SwiGLU MLP and the LM loss with hand-written backwards equal their references: transformers'
own LlamaRMSNorm / LlamaMLP / ForCausalLMLoss (forward bit-identical where promised, gradients tight), and
fall back to the module path where the fast one would be wrong (bf16 norms, LoRA-wrapped or hooked linears,
a user-set loss function)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from hf_moe import MoEForCausalLM
from hf_moe.modeling import cross_entropy, experts, gemm, normalization, softmax_attention
from hf_moe.modeling import mla_attention as mla_module
from hf_moe.modeling.cross_entropy import causal_lm_loss
from hf_moe.modeling.experts import MLP
from hf_moe.modeling.normalization import RMSNorm
from tests.conftest import tiny_config, tiny_gqa_config
from tests.modeling.test_attention_kernels import spy_calls


def parameter_grads(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    out = module(x)
    return [out, *torch.autograd.grad(out, (x, *module.parameters()), grad)]


def test_rms_norm_equals_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, normalization.RMSNormFunction, "apply")
    ours, theirs = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    mine, reference = parameter_grads(ours, x, grad), parameter_grads(theirs, x, grad)
    assert calls == [1]
    assert torch.equal(mine[0], reference[0])  # the forward is the same arithmetic
    for a, b in zip(mine[1:], reference[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_keeps_the_reference_math_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, normalization.RMSNormFunction, "apply")
    ours, theirs = RMSNorm(16).to(torch.bfloat16), LlamaRMSNorm(16).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))
    assert calls == []


def llama_mlp_pair(hidden: int = 32, inter: int = 40) -> tuple[MLP, LlamaMLP]:
    ours = MLP(tiny_config(hidden_size=hidden), inter)
    theirs = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu"))
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours, name).weight.normal_(0, 0.3)
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
    return ours, theirs


@pytest.mark.usefixtures("cpu_gemm")
def test_swiglu_mlp_equals_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    ours, theirs = llama_mlp_pair()
    x = torch.randn(2, 9, 32, requires_grad=True)
    grad = torch.randn(2, 9, 32)
    mine, reference = parameter_grads(ours, x, grad), parameter_grads(theirs, x, grad)
    assert calls == [1]
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_mlp_uses_the_modules_when_they_are_wrapped_or_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    ours, _ = llama_mlp_pair()
    seen = []
    handle = ours.up_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ours(torch.randn(5, 32))
    assert calls == [] and seen == [torch.Size([5, 40])]
    handle.remove()
    ours(torch.randn(5, 32))
    assert calls == [1]


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


@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
@pytest.mark.usefixtures("cpu_gemm")
def test_bf16_autocast_trains_and_generates_on_the_module_paths(make_config: object,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written Functions do not follow autocast's per-op dtypes: under autocast the module paths run
    (the loss stays close to fp32's, gradients flow) and generation works."""
    calls: list[int] = []
    for owner in (experts.SwiGLUFunction, cross_entropy.LinearCrossEntropyFunction, mla_module.MLAAttentionFunction,
                  softmax_attention.SoftmaxAttentionFunction, gemm.LinearFunction):
        spy_calls(monkeypatch, owner, "apply", calls)
    model = MoEForCausalLM(make_config()).train()
    ids = torch.randint(3, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert calls == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.embed_tokens.parameters())
    torch.testing.assert_close(loss.float(), model(input_ids=ids, labels=ids).loss, rtol=0.05, atol=0.05)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.usefixtures("cpu_gemm")
def test_accelerate_offload_hooks_keep_the_module_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate replaces `forward` of offloaded modules (no torch hook to see): such linears are not plain."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    fused_loss = spy_calls(monkeypatch, cross_entropy.LinearCrossEntropyFunction, "apply")
    swiglu = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    model = MoEForCausalLM(tiny_config(num_hidden_layers=2)).train()  # a dense MLP, then a shared-expert MLP
    add_hook_to_module(model.lm_head, ModelHook())
    add_hook_to_module(model.model.layers[0].mlp.down_proj, ModelHook())
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert fused_loss == [] and swiglu == [1]  # only the shared experts' MLP, which nothing hooks


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
