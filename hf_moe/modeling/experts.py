"""Feed-forward networks: the SwiGLU MLP (dense layers, shared experts) and the routed experts.

Routed experts are stored as fused 3-D weights, `gate_up_proj (N, 2I, H)` (gate rows, then up rows) and
`down_proj (N, H, I)`, the layout of transformers' experts interface: `@use_experts_implementation` lets
`config._experts_implementation` pick a backend (eager reference below, grouped_mm, our fused kernels...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration import MoEConfig
from .fast_paths import autocast_active, plain_linear, records_grad
from .gemm import addmm_into, mm, mm_into
from .scratch import WORKSPACE


def swiglu_backward_into(grad_gate: torch.Tensor, grad_up: torch.Tensor, grad_act: torch.Tensor, gate: torch.Tensor,
                         up: torch.Tensor) -> None:
    """grad_gate = da * u * silu'(g) and grad_up = da * silu(g) (each (N, I)) for a = silu(g) * u, with
    da = grad_act (N, I), which is overwritten."""
    torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad_act)
    torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)


class SwiGLUFunction(torch.autograd.Function):
    """y = W_d (silu(W_g x) * W_u x) with a hand-written backward (Shazeer 2020, eq. 6):

        a = silu(g) * u            dW_d = dy^T a           da = dy W_d
        dg = da * u * silu'(g)     du = da * silu(g)       dx = dg W_g + du W_u    dW_g = dg^T x    dW_u = du^T x

    Backward writes dg, du into scratch buffers and accumulates dx in place, instead of autograd's separate
    silu/mul backward passes and gradient sum. Products run through `gemm` (oneDNN where it is faster).
    """

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
        grad_act = mm_into(grad_rows, down_weight, WORKSPACE.empty("swiglu_i", act.shape, act))  # (N, I)
        grad_gate = WORKSPACE.empty("swiglu_gate", act.shape, act)  # (N, I) each, contiguous for the products
        grad_up = WORKSPACE.empty("swiglu_up", act.shape, act)
        swiglu_backward_into(grad_gate, grad_up, grad_act, gate, up)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = addmm_into(mm(grad_gate, gate_weight), grad_up, up_weight)
            grad_x = grad_x.view(*grad_output.shape[:-1], -1)
        grad_gate_w = mm(grad_gate.t(), rows) if ctx.needs_input_grad[1] else None
        grad_up_w = mm(grad_up.t(), rows) if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate_w, grad_up_w, grad_down


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020, SwiGLU). Plain SiLU layers run `SwiGLUFunction` when autograd
    records (without a graph the module path is the same math with less overhead)."""

    def __init__(self, config: MoEConfig, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused = config.hidden_act in ("silu", "swish")  # False forces the eager module path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if (self.fused and records_grad(x, *(p.weight for p in projections))
                and all(plain_linear(p) for p in projections) and not autocast_active(x)):
            return SwiGLUFunction.apply(x, *(p.weight for p in projections))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class RoutedExperts(nn.Module):
    """N SwiGLU experts in two fused 3-D parameters. `forward` is the eager reference every backend must match:
    y_t = sum_k g_{t,k} * FFN_{e_{t,k}}(x_t) (DeepSeekMoE eq. 3)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
        output = torch.zeros_like(hidden_states)
        slot_tokens, slot_experts = top_k_index.shape[1], top_k_index.reshape(-1)  # (T*K,)
        order = torch.argsort(slot_experts, stable=True)  # slots grouped by expert
        counts = torch.bincount(slot_experts, minlength=self.num_experts).tolist()
        for expert, slots in zip(range(self.num_experts), order.split(counts)):
            if slots.numel() == 0:
                continue
            tokens = slots // slot_tokens  # (S_e,)
            gate, up = F.linear(hidden_states[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])  # (S_e, H)
            weights = top_k_weights.reshape(-1)[slots, None].to(expert_out.dtype)
            output.index_add_(0, tokens, (expert_out * weights).to(output.dtype))
        return output
