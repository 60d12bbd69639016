"""The fused experts inside torch.compile / torch.export graphs, without host syncs in the traced code.

The eager fused path (`fused.py`) sizes its per-expert products on the host (one `.tolist()` per call), which a
tracer cannot follow: Dynamo either breaks the graph there or, through the autograd Function, hands Inductor
unbound size symbols (`NameError: name 's74' is not defined`). Traced code takes instead:

- at most `num_experts` token-slots (decode): `gathered_experts` of the reference model, static shapes, the
  chosen experts' weights gathered per slot, traced and fused by the compiler (what lets the decode step compile
  with `fullgraph=True` and, on CUDA, be captured as a graph);
- more slots (prefill, training): the custom op `hf_moe::fused_experts`, whose output shapes depend only on its
  input shapes (T, H); the compiler treats it as one opaque call, and inside it the eager fused kernels run
  unchanged (sort, one product per active expert, hand-written backward as the op `hf_moe::fused_experts_backward`).
  An exported program holding it runs where hf_moe is imported.
"""

from __future__ import annotations

import torch

from ...modeling.experts import gathered_experts
from .fused import SlotPlan, _experts_forward, experts_backward


@torch.library.custom_op("hf_moe::fused_experts", mutates_args=())
def fused_experts_op(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, H) -> output (T, H), and gate/up (S, 2I) and activation (S, I) in expert-sorted slot order (for backward)."""
    plan = SlotPlan.build(top_k_index, gate_up_proj.shape[0])
    output, gate_up, act, _ = _experts_forward(hidden_states, gate_up_proj, down_proj, top_k_weights, plan, mode)
    return output, gate_up, act.clone() if act._base is not None else act


@fused_experts_op.register_fake
def _(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, top_k_index: torch.Tensor,
      top_k_weights: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slots, inter = top_k_index.numel(), down_proj.shape[2]
    return (hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty(slots, 2 * inter),
            hidden_states.new_empty(slots, inter))


@torch.library.custom_op("hf_moe::fused_experts_backward", mutates_args=())
def fused_experts_backward_op(
    grad_output: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor, act: torch.Tensor, mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden_states, gate_up_proj, down_proj and top_k_weights (`fused.experts_backward`)."""
    plan = SlotPlan.build(top_k_index, gate_up_proj.shape[0])  # the forward's plan, rebuilt (one sort)
    slot_weights = top_k_weights.reshape(-1).index_select(0, plan.order).to(hidden_states.dtype)  # (S,)
    grads = experts_backward(grad_output, hidden_states, gate_up_proj, down_proj, gate_up, act, slot_weights, plan,
                             mode, top_k_index.shape[1], top_k_weights.dtype, (True, True, True, True))
    return tuple(g.clone() if g._base is not None else g for g in grads)


@fused_experts_backward_op.register_fake
def _(grad_output: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
      top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor, act: torch.Tensor,
      mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty_like(hidden_states), torch.empty_like(gate_up_proj), torch.empty_like(down_proj),
            torch.empty_like(top_k_weights))


def _setup_context(ctx: object, inputs: tuple, output: tuple) -> None:
    hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, mode = inputs
    _, gate_up, act = output
    ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up, act)
    ctx.mode = mode


def _backward(ctx: object, grad_output: torch.Tensor, *_: torch.Tensor) -> tuple:
    hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up, act = ctx.saved_tensors
    grad_x, grad_gu, grad_d, grad_w = fused_experts_backward_op(
        grad_output.contiguous(), hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up, act,
        ctx.mode)
    return grad_x, grad_gu, grad_d, None, grad_w, None


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)


def traced_fused_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                         gate_up_proj: torch.Tensor, down_proj: torch.Tensor, mode: str = "loop") -> torch.Tensor:
    """The fused experts for traced code (see the module docstring): (T, H) x (T, K) ids / weights -> (T, H)."""
    if top_k_index.numel() <= gate_up_proj.shape[0]:
        return gathered_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    return fused_experts_op(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, mode)[0]
