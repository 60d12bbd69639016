"""The SwiGLU MLP y = W_d (silu(W_g x) * W_u x) with a hand-written backward, for CPU fp32 training
(Shazeer 2020, eq. 6):

    a = silu(g) * u            dW_d = dy^T a           da = dy W_d
    dg = da * u * silu'(g)     du = da * silu(g)       dx = dg W_g + du W_u    dW_g = dg^T x    dW_u = du^T x

Backward writes dg, du into scratch memory and accumulates dx in place, instead of autograd's separate silu/mul
backward passes and gradient sum. Products run through `gemm` (oneDNN where it is the process's GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..eligible import eligible
from .gemm import addmm_into, mm, mm_into
from .scratch import scratch


def swiglu_backward_into(grad_gate: torch.Tensor, grad_up: torch.Tensor, grad_act: torch.Tensor, gate: torch.Tensor,
                         up: torch.Tensor) -> None:
    """grad_gate = da * u * silu'(g) and grad_up = da * silu(g) (each (N, I)) for a = silu(g) * u, with
    da = grad_act (N, I), which is overwritten."""
    torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad_act)
    torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)


class SwiGLUFunction(torch.autograd.Function):
    """y = W_d (silu(W_g x) * W_u x), see the module docstring."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, gate_weight: torch.Tensor,  # noqa: D102
                up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, H)
        gate, up = mm(rows, gate_weight.t()), mm(rows, up_weight.t())  # (N, I) each
        act = F.silu(gate).mul_(up)  # (N, I)
        ctx.save_for_backward(rows, gate_weight, up_weight, down_weight, gate, up, act)
        return mm(act, down_weight.t()).view(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        rows, gate_weight, up_weight, down_weight, gate, up, act = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])  # (N, H)
        grad_down = mm(grad_rows.t(), act) if ctx.needs_input_grad[3] else None
        grad_act = mm_into(grad_rows, down_weight, scratch(act.shape, act))  # (N, I)
        grad_gate, grad_up = scratch(act.shape, act), scratch(act.shape, act)  # contiguous for the products
        swiglu_backward_into(grad_gate, grad_up, grad_act, gate, up)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = addmm_into(mm(grad_gate, gate_weight), grad_up, up_weight)
            grad_x = grad_x.view(*grad_output.shape[:-1], -1)
        grad_gate_w = mm(grad_gate.t(), rows) if ctx.needs_input_grad[1] else None
        grad_up_w = mm(grad_up.t(), rows) if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate_w, grad_up_w, grad_down


def swiglu_kernel(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The "swiglu" kernel for an MLP with SiLU and plain bias-free gate/up/down Linears: `SwiGLUFunction` for an
    fp32 CPU call that autograd records (without a graph the module path is the same math), else None."""
    projections = (module.gate_proj, module.up_proj, module.down_proj)
    weights = tuple(p.weight for p in projections)
    if not module.fused or not eligible(x, *weights, training=True, modules=projections):
        return None
    return SwiGLUFunction.apply(x, *weights)
