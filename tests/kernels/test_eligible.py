"""The one eligibility rule: the kernels step aside under autocast, for wrapped or hooked modules (accelerate's
offload hooks) and off CPU, and the model then runs its reference paths."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.kernels.cpu import attention as softmax_attention
from hf_moe.kernels.cpu import gemm
from hf_moe.kernels.cpu import lm_loss as cross_entropy
from hf_moe.kernels.cpu import mla_attention as mla_module
from hf_moe.kernels.cpu import swiglu as experts
from tests.conftest import tiny_config, tiny_gqa_config
from tests.kernels.helpers import spy_calls


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


def test_every_seam_kernel_declines_other_devices_dtypes_and_no_grad() -> None:
    """Measured on CPU fp32 only: a "meta" device (standing for CUDA and the rest), fp64, and training kernels
    without a graph all get None, i.e. the reference path."""
    from hf_moe.kernels import SEAM_KERNELS
    from hf_moe.modeling.experts import MLP
    from hf_moe.modeling.normalization import RMSNorm

    def calls(device: str, dtype: torch.dtype, grad: bool) -> dict[str, object]:
        norm, mlp, head = RMSNorm(16), MLP(tiny_config(hidden_size=16), 24), torch.nn.Linear(16, 40, bias=False)
        for module in (norm, mlp, head):
            module.to(device=device, dtype=dtype)
        x = torch.randn(2, 5, 16, device=device, dtype=dtype, requires_grad=grad)
        angles = torch.randn(2, 1, 5, 4, device=device, dtype=dtype)
        labels = torch.randint(0, 40, (2, 5), device=device)
        with torch.set_grad_enabled(grad):
            return {
                "rms_norm": SEAM_KERNELS["rms_norm"](norm, x),
                "rope": SEAM_KERNELS["rope"](x.view(2, 1, 5, 16)[..., :8], angles, angles, False),
                "swiglu": SEAM_KERNELS["swiglu"](mlp, x),
                "lm_head_loss": SEAM_KERNELS["lm_head_loss"](head, x, labels),
                "causal_lm_loss": SEAM_KERNELS["causal_lm_loss"](head(x), labels, 40),
            }

    assert all(out is not None for out in calls("cpu", torch.float32, True).values())  # the fast case
    for device, dtype, grad in (("meta", torch.float32, True), ("cpu", torch.float64, True),
                                ("cpu", torch.float32, False)):
        assert calls(device, dtype, grad) == dict.fromkeys(("rms_norm", "rope", "swiglu", "lm_head_loss",
                                                            "causal_lm_loss")), (device, dtype, grad)
