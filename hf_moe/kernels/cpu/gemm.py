"""fp32 matrix products on CPU: torch's default GEMM (MKL's sgemm) or oneDNN's, an explicit process setting.

torch multiplies fp32 matrices on CPU with MKL, which on AMD processors runs a narrower code path: on a 2-core
AMD EPYC (Zen 5) we measured 195-210 GFLOP/s for a 2048^3 `torch.mm` against 400-465 GFLOP/s for the same
product through oneDNN (`torch.ops.mkldnn._linear_pointwise`, which ships with every x86 CPU build of torch and reads
ordinary strided tensors). On Intel CPUs both reach about the same speed. The setting, one per process:

- `hf_moe.kernels.set_cpu_gemm("onednn" | "aten" | "auto")`, or the environment variable `HF_MOE_CPU_GEMM`
  read at the first product when nothing was set; `cpu_gemm()` says which GEMM is in use.
- "auto" (the default): time both on one 512^3 product, keep oneDNN only if it is >= 1.2x faster and agrees
  with torch's result. Where the setting comes from and what was chosen is logged (logger
  `hf_moe.kernels.cpu.gemm`, INFO); "onednn" raises where torch has no oneDNN.

Only the CPU kernels of hf_moe.kernels call these helpers; everything else, every other device and dtype, and
products too small to pay oneDNN's ~15 us call overhead (fewer than 4 rows or 2^21 multiply-adds) run
`torch.mm`. oneDNN has no `out=`: `mm_into` copies its result. The model (hf_moe.modeling, the Hub bundle)
knows nothing of this: it calls its Linear layers, and the "linear" kernel (`linear_kernel`) takes the calls
that oneDNN runs faster.

oneDNN compiles a kernel per product shape (~0.2-0.4 ms here) and caches 1024 of them. Products whose shapes
vary from call to call (token counts of variable-length batches) take oneDNN only from 2^26 multiply-adds on,
where it wins even when it compiles on every call; callers that keep their shapes to a small recurring set
(the fused experts round each expert's row count, see `kernels.experts.fused.padded_count`) pass `bucketed=True` and
take it from 2^21 on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..eligible import eligible, records_grad
from .scratch import scratch

logger = logging.getLogger(__name__)

CPU_GEMMS = ("auto", "onednn", "aten")
ENV_VAR = "HF_MOE_CPU_GEMM"
MIN_ROWS = 4  # below this a product is a matrix-vector one, where MKL's call is cheaper
MIN_MACS_BUCKETED = 1 << 21  # multiply-adds below which oneDNN's per-call overhead outweighs its speed
MIN_MACS = 1 << 26  # ... and below which compiling a kernel for a new shape costs more than oneDNN saves


def _onednn_linear_op() -> object | None:
    """torch's oneDNN linear (x @ w^T on dense strided tensors), or None where this build has none."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_linear_op()
_choice: str | None = None  # "onednn" or "aten" once decided


def onednn_available() -> bool:
    """This torch build can run oneDNN's linear on CPU."""
    return _ONEDNN is not None


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b through oneDNN, which takes the right operand with any strides but copies a non-contiguous left
    one: that copy goes to scratch memory (a fresh tensor page-faults, see scratch.py)."""
    if not a.is_contiguous():
        a = scratch(a.shape, a).copy_(a)
    return _ONEDNN(a, b.t(), None, "none", [], "")


def _probe() -> str:
    """Time torch.mm and oneDNN on one 512^3 fp32 product (best of 5 after a warm-up) and check they agree.
    Runs with autocast off and explicit dtypes: the first fast-path call may come under autocast or another
    default dtype, which must not decide the process's choice."""
    with torch.autocast("cpu", enabled=False):
        return _timed_probe()


def _timed_probe() -> str:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=generator, dtype=torch.float32, device="cpu")
    b = torch.randn(512, 512, generator=generator, dtype=torch.float32, device="cpu")

    def best(fn: object) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        agree = torch.allclose(onednn_mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-3)
        aten, onednn = best(lambda: torch.mm(a, b)), best(lambda: onednn_mm(a, b))
    except RuntimeError as error:  # a oneDNN build that cannot run here
        logger.info("hf_moe CPU GEMM: torch.mm (oneDNN failed: %s)", error)
        return "aten"
    choice = "onednn" if agree and aten > 1.2 * onednn else "aten"
    logger.info("hf_moe CPU GEMM: %s (512^3 fp32: torch.mm %.2f ms, oneDNN %.2f ms%s)", choice, aten * 1e3,
                onednn * 1e3, "" if agree else ", results disagree")
    return choice


def cpu_gemm() -> str:
    """The fp32 CPU GEMM in use, "onednn" or "aten": the last `set_cpu_gemm`, else `HF_MOE_CPU_GEMM` (default
    "auto"), resolved at the first call and logged (see the module docstring)."""
    global _choice
    if _choice is None:
        requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"{ENV_VAR}={requested!r}" if ENV_VAR in os.environ else f"default ({ENV_VAR} unset)"
        _choice = _resolve(requested, source=source)
        logger.info("hf_moe CPU GEMM in use: %s (%s; change with hf_moe.kernels.set_cpu_gemm)", _choice, source)
    return _choice


def _resolve(requested: str, source: str) -> str:
    if requested not in CPU_GEMMS:
        raise ValueError(f"{source} is not one of {CPU_GEMMS}")
    if requested == "aten":
        return "aten"
    if _ONEDNN is None:
        if requested == "onednn":
            raise RuntimeError(f"{source}: this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
        return "aten"
    return "onednn" if requested == "onednn" else _probe()


def set_cpu_gemm(name: str) -> str:
    """Choose the fp32 CPU GEMM for this process: "onednn", "aten" or "auto" (probes again); returns the one now
    in use."""
    global _choice
    _choice = _resolve(name, source=f"set_cpu_gemm({name!r})")
    return _choice


@contextmanager
def cpu_gemm_override(name: str) -> Iterator[str]:
    """`set_cpu_gemm(name)` for the duration of a block (tests, benchmarks), then the previous choice."""
    previous = cpu_gemm()
    try:
        yield set_cpu_gemm(name)
    finally:
        global _choice
        _choice = previous


def onednn_active(tensor: torch.Tensor) -> bool:
    """Products of this tensor's kind (CPU fp32) may run through oneDNN: it is this process's choice and
    `torch.backends.mkldnn.enabled` is not switched off."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and cpu_gemm() == "onednn"
            and torch.backends.mkldnn.enabled)


def _use_onednn(a: torch.Tensor, b: torch.Tensor, bucketed: bool) -> bool:
    rows, inner = a.shape
    return (rows >= MIN_ROWS and rows * inner * b.shape[1] >= (MIN_MACS_BUCKETED if bucketed else MIN_MACS)
            and b.dtype == torch.float32 and onednn_active(a))


def mm(a: torch.Tensor, b: torch.Tensor, bucketed: bool = False) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) contiguous; any strides. Not differentiable: for use inside Functions. In the
    operands' dtype on either GEMM, also under autocast (as torch.mm's `out=` form, which autocast leaves alone).
    `bucketed`: the caller multiplies few distinct shapes (see the module docstring)."""
    if _use_onednn(a, b, bucketed):
        return onednn_mm(a, b)
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return torch.mm(a, b)
    return torch.mm(a, b)


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bucketed: bool = False) -> torch.Tensor:
    """out (M, N) = a @ b; returns out."""
    if _use_onednn(a, b, bucketed):
        return out.copy_(onednn_mm(a, b))
    return torch.mm(a, b, out=out)


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (M, N) += a @ b; returns out."""
    if _use_onednn(a, b, False):
        return out.add_(onednn_mm(a, b))
    return out.addmm_(a, b)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T -> (..., N), like F.linear without a bias. Not differentiable."""
    return mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = linear(x, weight)
    return out if bias is None else out.add_(bias)


class LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) through `mm`: dx = dy W, dW = dy^T x, db = sum of dy over rows. Saves x only when W
    trains and W only when x needs its gradient, as autograd does for F.linear."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,  # noqa: D102
                bias: torch.Tensor | None) -> torch.Tensor:
        need_x, need_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_weight else None, weight if need_x else None)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
        grad_x = mm(grad_rows, weight).view(ctx.input_shape) if ctx.needs_input_grad[0] else None
        grad_weight = mm(grad_rows.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear_kernel(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The "linear" kernel: module(x) through `mm` where oneDNN is in use for x and the product is large enough
    for it (CPU fp32, a plain nn.Linear, see `eligible`); None everywhere else (the module runs)."""
    if (not eligible(x, module.weight, modules=(module,), allow_bias=True) or not onednn_active(x)
            or x.numel() // x.shape[-1] * module.in_features * module.out_features < MIN_MACS):
        return None
    if records_grad(x, module.weight, *(() if module.bias is None else (module.bias,))):
        return LinearFunction.apply(x, module.weight, module.bias)
    return _linear(x, module.weight, module.bias)
