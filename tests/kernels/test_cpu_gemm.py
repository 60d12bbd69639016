"""The fp32 CPU GEMM setting (`hf_moe.kernels.cpu.gemm`): oneDNN's products equal torch.mm's for every operand layout
the fast paths pass, LinearFunction's gradients equal autograd's through F.linear, small products and wrapped,
hooked, autocast or non-fp32 layers keep torch's path, and the choice (environment, probe) is explicit and logged."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_moe.kernels.cpu import gemm
from hf_moe.modeling.kernel_hooks import project
from tests.conftest import onednn_for_every_size

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear")


def layouts(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """One (rows, cols) matrix in each layout the fast paths produce: contiguous, transposed, a slice of a wider
    buffer (row stride > cols), a transposed slice and a column block (the gate/up halves of one buffer)."""
    wide = torch.randn(rows + 3, 2 * cols + 5)
    return {
        "contiguous": torch.randn(rows, cols),
        "transposed": torch.randn(cols, rows).t(),
        "row_slice": wide[2 : 2 + rows, 1 : 1 + cols],
        "transposed_slice": torch.randn(cols + 4, rows + 7)[3 : 3 + cols, :rows].t(),
        "column_block": wide[:rows, cols + 5 :],
    }


@pytest.fixture
def onednn_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    onednn_for_every_size(monkeypatch)
    with gemm.cpu_gemm_override("onednn"):
        yield


def count_onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    real = gemm._ONEDNN

    def spy(x: torch.Tensor, w: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, *args)

    monkeypatch.setattr(gemm, "_ONEDNN", spy)
    return calls


@pytest.mark.parametrize("left", list(layouts(2, 2)))
@pytest.mark.parametrize("right", list(layouts(2, 2)))
def test_products_equal_torch_mm_for_every_layout(left: str, right: str, onednn_everywhere: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_onednn_calls(monkeypatch)
    a, b = layouts(37, 53)[left], layouts(53, 29)[right]
    expected = torch.mm(a.double(), b.double()).float()
    torch.testing.assert_close(gemm.mm(a, b), expected, rtol=1e-5, atol=1e-5)
    out = torch.full((41, 29), float("nan"))[2:-2]
    assert gemm.mm_into(a, b, out) is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    base = torch.randn(37, 29)
    torch.testing.assert_close(gemm.addmm_into(base.clone(), a, b), base + expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3
    assert a.stride() == layouts(37, 53)[left].stride()  # the operands are left as they were


def test_linear_equals_f_linear_on_batched_inputs(onednn_everywhere: None) -> None:
    x, w = torch.randn(3, 7, 16), torch.randn(24, 16)
    torch.testing.assert_close(gemm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm.linear(x.transpose(0, 1), w), F.linear(x.transpose(0, 1), w), rtol=1e-5,
                               atol=1e-5)


@needs_onednn
def test_small_products_stay_on_torch_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Matrix-vector products and products too small for oneDNN's call overhead stay on torch.mm; products of
    shapes that may change every call need 2^26 multiply-adds (a kernel compiled per new shape still pays off),
    bucketed ones 2^21."""
    calls = count_onednn_calls(monkeypatch)
    with gemm.cpu_gemm_override("onednn"):
        gemm.mm(torch.randn(1, 512), torch.randn(512, 4096), bucketed=True)  # a decode step's row
        gemm.mm(torch.randn(8, 16), torch.randn(16, 16), bucketed=True)  # too few multiply-adds
        gemm.mm(torch.randn(64, 256), torch.randn(256, 256))  # 4M: only if bucketed
        assert calls == []
        gemm.mm(torch.randn(64, 256), torch.randn(256, 256), bucketed=True)
        gemm.mm(torch.randn(256, 512), torch.randn(512, 512))  # 64M
        assert calls == [((64, 256), (256, 256)), ((256, 512), (512, 512))]
        gemm.mm(torch.randn(256, 512, dtype=torch.float64), torch.randn(512, 512, dtype=torch.float64))
        assert len(calls) == 2  # fp64 is torch's
    with gemm.cpu_gemm_override("aten"):
        gemm.mm(torch.randn(256, 512), torch.randn(512, 512))
        assert len(calls) == 2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_linear_function_gradients_equal_autograd(bias: bool, frozen_weight: bool, onednn_everywhere: None) -> None:
    layer = nn.Linear(16, 24, bias=bias)
    layer.weight.requires_grad_(not frozen_weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad = torch.randn(5, 3, 24).transpose(0, 1)  # a non-contiguous upstream gradient
    params = [p for p in layer.parameters() if p.requires_grad]
    out = project(layer, x)
    assert type(out.grad_fn).__name__ == "LinearFunctionBackward"
    got = [out, *torch.autograd.grad(out, [x, *params], grad)]
    reference = F.linear(x, layer.weight, layer.bias)
    want = [reference, *torch.autograd.grad(reference, [x, *params], grad)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_project_without_grad_is_linear(onednn_everywhere: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_onednn_calls(monkeypatch)
    layer = nn.Linear(16, 24)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        out = project(layer, x)
    assert out.grad_fn is None and len(calls) == 1
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_project_keeps_the_module_path_where_it_must(onednn_everywhere: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hooks must fire, LoRA-wrapped and quantised layers run their own forward, autocast picks its dtypes, and
    non-fp32 tensors are torch's: none of them reaches oneDNN."""
    from peft import LoraConfig, get_peft_model

    calls = count_onednn_calls(monkeypatch)
    x = torch.randn(4, 16, requires_grad=True)
    hooked = nn.Linear(16, 8)
    seen = []
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    project(hooked, x)
    assert seen == [torch.Size([4, 8])]

    wrapper = nn.Sequential()
    wrapper.add_module("proj", nn.Linear(16, 8))
    lora = get_peft_model(wrapper, LoraConfig(target_modules=["proj"], r=2, init_lora_weights=False))
    torch.testing.assert_close(project(lora.base_model.model.proj, x), lora(x))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert project(nn.Linear(16, 8), x).dtype == torch.bfloat16
    project(nn.Linear(16, 8).double(), x.double())

    backward_hooked = nn.Linear(16, 8)
    backward_hooked.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append("backward"))
    project(backward_hooked, x).sum().backward()
    assert seen[-1] == "backward"
    replaced = nn.Linear(16, 8)
    replaced.forward = lambda inputs: seen.append("replaced") or nn.functional.linear(inputs, replaced.weight)
    project(replaced, x)
    assert seen[-1] == "replaced"
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append("global"))
    project(nn.Linear(16, 8), x)
    handle.remove()
    assert seen[-1] == "global"
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        project(nn.Linear(16, 8), x)
    assert calls == []
    project(nn.Linear(16, 8), x)
    assert len(calls) == 1


def test_environment_chooses_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_choice", None)
    monkeypatch.setenv(gemm.ENV_VAR, "aten")
    assert gemm.cpu_gemm() == "aten"
    monkeypatch.setattr(gemm, "_choice", None)
    monkeypatch.setenv(gemm.ENV_VAR, "mkl")
    with pytest.raises(ValueError, match=r"HF_MOE_CPU_GEMM='mkl' is not one of \('auto', 'onednn', 'aten'\)"):
        gemm.cpu_gemm()
    with pytest.raises(ValueError, match=r"set_cpu_gemm\('fast'\)"):
        gemm.set_cpu_gemm("fast")


def test_onednn_where_torch_has_none_raises_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_choice", None)
    monkeypatch.setattr(gemm, "_ONEDNN", None)
    assert not gemm.onednn_available()
    with pytest.raises(RuntimeError, match="no oneDNN linear"):
        gemm.set_cpu_gemm("onednn")
    assert gemm.set_cpu_gemm("auto") == "aten"


@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_function_saves_only_what_backward_needs(weight_trains: bool, onednn_everywhere: None) -> None:
    """A frozen weight needs only itself for dx, as autograd's F.linear: the input is not kept alive."""
    layer = nn.Linear(32, 48, bias=False).requires_grad_(weight_trains)
    x = torch.randn(6, 32, requires_grad=True) * 2  # a non-leaf input, as activations are
    saved: dict[str, list[int]] = {}
    for name, fn in (("ours", lambda: project(layer, x)), ("autograd", lambda: F.linear(x, layer.weight))):
        sizes: list[int] = []  # autograd keeps W^T, we keep W: compare sizes
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            fn()
        saved[name] = sorted(sizes)
    assert saved["ours"] == saved["autograd"] == sorted([48 * 32] + [6 * 32] * weight_trains)


@needs_onednn
def test_probe_is_not_misled_by_autocast_or_the_default_dtype(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The first fast-path call, which runs the probe, may come under autocast or another default dtype."""
    with caplog.at_level(logging.INFO, logger="hf_moe.kernels.cpu.gemm"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            monkeypatch.setattr(gemm, "_choice", None)
            gemm.set_cpu_gemm("auto")
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            gemm.set_cpu_gemm("auto")
        finally:
            torch.set_default_dtype(default)
    assert caplog.text.count("hf_moe CPU GEMM") == 2
    assert "failed" not in caplog.text and "disagree" not in caplog.text


@needs_onednn
def test_auto_probe_logs_its_choice_and_refuses_wrong_results(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(gemm, "_choice", None)
    with caplog.at_level(logging.INFO, logger="hf_moe.kernels.cpu.gemm"):
        choice = gemm.set_cpu_gemm("auto")
    assert choice in ("onednn", "aten")
    assert f"hf_moe CPU GEMM: {choice}" in caplog.text and "torch.mm" in caplog.text
    real = gemm._ONEDNN
    monkeypatch.setattr(gemm, "_ONEDNN", lambda x, w, *args: real(x, w, *args) + 1.0)  # fast but wrong
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_moe.kernels.cpu.gemm"):
        assert gemm.set_cpu_gemm("auto") == "aten"
    assert "results disagree" in caplog.text


def test_override_restores_the_previous_choice() -> None:
    before = gemm.cpu_gemm()
    with gemm.cpu_gemm_override("aten") as inside:
        assert inside == "aten" == gemm.cpu_gemm()
    assert gemm.cpu_gemm() == before


@pytest.mark.parametrize("make_config", ["mla", "gqa"])
def test_model_training_on_onednn_equals_torch_mm(make_config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A padded training batch (MTP on, fused experts, every fast path): loss, logits and every parameter gradient
    with all products on oneDNN equal those on torch.mm; greedy generation gives the same tokens."""
    from hf_moe import MoEForCausalLM
    from tests.conftest import tiny_config, tiny_gqa_config

    onednn_for_every_size(monkeypatch)
    make = tiny_config if make_config == "mla" else tiny_gqa_config
    model = MoEForCausalLM(make(num_nextn_predict_layers=1, mtp_loss_weight=0.3, attn_implementation="hf_moe_sdpa"))
    model.set_experts_implementation("hf_moe_fused")
    ids = torch.randint(3, 97, (3, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    calls = count_onednn_calls(monkeypatch)
    results, tokens = {}, {}
    for choice in ("aten", "onednn"):
        with gemm.cpu_gemm_override(choice):
            model.train().zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            results[choice] = out.loss.detach(), out.logits.detach()[mask.bool()], {
                name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            tokens[choice] = model.eval().generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        if choice == "aten":
            assert calls == []
    assert len(calls) > 50  # projections, experts, MLPs and the LM head all ran there
    torch.testing.assert_close(results["onednn"][0], results["aten"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["onednn"][1], results["aten"][1], rtol=1e-5, atol=1e-5)
    assert results["onednn"][2].keys() == results["aten"][2].keys()
    for name, grad in results["aten"][2].items():
        torch.testing.assert_close(results["onednn"][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(tokens["onednn"], tokens["aten"])
