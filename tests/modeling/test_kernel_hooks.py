"""The seam: named kernels registered, looked up, declined and removed; bad names and non-callables are named in
the error; the model runs its reference code when a kernel is absent; modeling/ never imports the kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling import kernel_hooks
from hf_moe.modeling.kernel_hooks import get_kernel, register_kernel, run_kernel, unregister_kernel
from tests.conftest import tiny_config

MODELING = Path(kernel_hooks.__file__).parent


def test_register_run_and_unregister() -> None:
    assert get_kernel("test_double") is None and run_kernel("test_double", 3) is None
    register_kernel("test_double", lambda x: None if x < 0 else 2 * x)
    try:
        assert "test_double" in kernel_hooks.registered_kernels()
        assert run_kernel("test_double", 3) == 6
        assert run_kernel("test_double", -1) is None  # declined: the caller runs its reference
    finally:
        assert unregister_kernel("test_double") is not None
    assert get_kernel("test_double") is None and unregister_kernel("test_double") is None


def test_bad_registrations_are_named() -> None:
    with pytest.raises(ValueError, match="non-empty string, got ''"):
        register_kernel("", print)
    with pytest.raises(TypeError, match="kernel 'x' must be callable, got int"):
        register_kernel("x", 3)


def test_without_kernels_the_model_runs_its_reference_with_the_same_results() -> None:
    """Every seam kernel removed (as in a process without hf_moe): same loss, logits and gradients."""
    model = MoEForCausalLM(tiny_config(attn_implementation="sdpa", experts_implementation="eager")).train()
    ids = torch.randint(3, 97, (2, 11))
    results = []
    for remove in (False, True):
        saved = {name: unregister_kernel(name) for name in kernel_hooks.registered_kernels()} if remove else {}
        try:
            model.zero_grad()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            results.append((out.loss.detach(), out.logits.detach(),
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        finally:
            for name, fn in saved.items():
                register_kernel(name, fn)
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_modeling_never_imports_hf_moe() -> None:
    """kernels import modeling, never the reverse: no modeling file imports hf_moe (hf_moe.kernels, hf_moe.hub...)
    absolutely or by a relative import out of the folder, not even inside a function."""
    problems = []
    for path in sorted(MODELING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = ["hf_moe"] if node.level > 1 else [node.module or ""] if node.level == 0 else []
            if any(name == "hf_moe" or name.startswith("hf_moe.") for name in names):
                problems.append(f"{path.name}:{node.lineno}")
    assert problems == []
