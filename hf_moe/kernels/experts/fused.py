"""Fused routed-experts backend: one sort of token-slots, gather, per-expert (or grouped) matmuls, routing
weight applied before the down projection, scatter back, and a hand-written backward.

Notation (shapes in names): T tokens, K experts per token, S = T*K token-slots, E experts, H hidden width,
I expert width. For slot s (sorted by expert) with token t(s), expert e(s) and gate weight w(s):

    gu_s  = W_gu[e] x_t               (S, 2I)   gate rows then up rows
    a_s   = silu(g_s) * u_s            (S, I)
    y_t   = sum_s [t(s) = t] W_d[e] (w_s a_s)

Backward (dy = upstream gradient, gathered per slot: dy_s = dy_t(s)):

    d(w a)_s = W_d[e]^T dy_s           dW_d[e] = sum_s dy_s (w_s a_s)^T
    dw_s     = <d(w a)_s, a_s>         da_s = w_s d(w a)_s
    dg_s     = da_s * u_s * silu'(g_s)   du_s = da_s * silu(g_s)
    dx_t     = sum_s W_gu[e]^T dgu_s   dW_gu[e] = sum_s dgu_s x_t^T

Only the expert-width activations gu (S, 2I) and a (S, I) are saved; the token gather x_t(s) (S, H) is
recomputed in backward instead of stored. The slot bookkeeping costs one stable argsort, one bincount and
a single host sync (`.tolist()`) per forward. On CPU the transient slot-sized tensors live in scratch memory
(`hf_moe.kernels.cpu.scratch`: fresh multi-megabyte allocations cost page faults that rival the matmuls), each
its own buffer for as long as it lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..cpu import gemm
from ..cpu.scratch import scratch
from ..cpu.swiglu import swiglu_backward_into
from ..eligible import records_grad

MATMUL_MODES = ("loop", "grouped_mm")
FEW_SLOTS = 8  # token-slots (T * K) up to which a CPU forward without autograd runs slot by slot


def padded_count(count: int) -> int:
    """count rounded up to a multiple of max(8, ~count/16): at most ~6% more rows (<8 rows for small experts),
    and few distinct sizes, so that oneDNN's cache of per-shape kernels (1024 entries by default) holds the
    products of every expert size training produces instead of compiling one for each new token count."""
    step = max(8, 1 << max(count.bit_length() - 5, 0))
    return -(-count // step) * step


@dataclass
class SlotPlan:
    """Token-slots sorted by expert: which token each sorted slot reads, and the per-expert segments.

    Products run over rows: the sorted slots themselves, or (`build(..., pad=True)`) the sorted slots with each
    expert's segment padded by zero rows to `padded_count` (the CPU oneDNN path). Pad rows read token 0 and are
    zeroed after every gather, carry routing weight 0, come last in their segment and are never added into a
    token's output or input gradient; results are those of the unpadded plan."""

    order: torch.Tensor  # (S,) slot index (t * K + k) of each sorted position
    tokens: torch.Tensor  # (S,) token index t(s) of each sorted position
    per_expert: torch.Tensor  # (E,) slots per expert
    offsets: torch.Tensor  # (E,) int32 cumulative counts (grouped_mm's `offs`), unpadded
    row_tokens: torch.Tensor  # (R,) token each row reads (pad rows: 0); `tokens` when unpadded
    rows: torch.Tensor | None = None  # (S,) row of each sorted slot; None when unpadded (row = sorted position)
    pad_rows: torch.Tensor | None = None  # (R - S,) the pad rows; None when unpadded
    bucketed: bool = False  # segment lengths are `padded_count`s (whether or not any needed padding)
    _counts: list[int] | None = None
    _segments: list[tuple[int, int, int]] | None = None

    @classmethod
    def build(cls, top_k_index: torch.Tensor, num_experts: int, pad: bool = False) -> SlotPlan:
        """top_k_index (T, K) -> plan. Stable sort keeps slots of one expert in token order."""
        top_k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)  # (S,)
        order = torch.argsort(flat, stable=True)
        per_expert = torch.bincount(flat, minlength=num_experts)  # (E,)
        offsets = per_expert.cumsum(0).to(torch.int32)
        tokens = order // top_k
        plan = cls(order=order, tokens=tokens, per_expert=per_expert, offsets=offsets, row_tokens=tokens)
        if pad:
            plan._pad()
        return plan

    def _pad(self) -> None:
        self.bucketed = True
        counts = self.counts
        padded = [padded_count(count) for count in counts]
        if padded == counts:
            return
        device = self.order.device
        padded_starts = _starts(padded)
        shift = torch.tensor([p_start - start for p_start, start in zip(padded_starts, _starts(counts))],
                             device=device)  # (E,) how far each expert's segment moves
        rows = torch.arange(self.order.shape[0], device=device) + shift.repeat_interleave(self.per_expert)  # (S,)
        num_rows = sum(padded)
        is_pad = torch.ones(num_rows, dtype=torch.bool, device=device).index_fill_(0, rows, False)
        self.rows, self.pad_rows = rows, is_pad.nonzero().squeeze(1)
        self.row_tokens = self.tokens.new_zeros(num_rows).index_copy_(0, rows, self.tokens)
        self._segments = [(expert, start, length) for expert, (start, length) in
                          enumerate(zip(padded_starts, padded)) if length]

    @property
    def num_rows(self) -> int:
        return self.row_tokens.shape[0]

    @property
    def counts(self) -> list[int]:
        """Slots per expert on the host: the one device-to-host sync, done once and only when needed."""
        if self._counts is None:
            self._counts = self.per_expert.tolist()
        return self._counts

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, first row, rows) of every expert with slots: decode touches only these."""
        if self._segments is None:
            self._segments = [(expert, start, count) for expert, (start, count) in
                              enumerate(zip(_starts(self.counts), self.counts)) if count]
        return self._segments

    def to_rows(self, sorted_values: torch.Tensor) -> torch.Tensor:
        """(S, ...) values in sorted-slot order -> (R, ...) in row order, zero on pad rows."""
        if self.rows is None:
            return sorted_values
        out = sorted_values.new_zeros(self.num_rows, *sorted_values.shape[1:])
        return out.index_copy_(0, self.rows, sorted_values)

    def from_rows(self, row_values: torch.Tensor) -> torch.Tensor:
        """(R, ...) values in row order -> (S, ...) in sorted-slot order."""
        return row_values if self.rows is None else row_values.index_select(0, self.rows)


def _starts(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += length
    return starts


def _mm_segments(inputs: torch.Tensor, weight: torch.Tensor, plan: SlotPlan, transpose: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert matmul over sorted slots: rows of segment e times weight[e]^T (or weight[e] if not transpose).

    inputs (S, in), weight (E, out, in) if transpose else (E, in, out) -> (S, out), written into `out` if given.
    """
    out_dim = weight.shape[1] if transpose else weight.shape[2]
    if out is None:
        out = inputs.new_empty(inputs.shape[0], out_dim)
    weight = weight.transpose(1, 2) if transpose else weight
    for expert, start, count in plan.segments:
        gemm.mm_into(inputs[start : start + count], weight[expert], out[start : start + count], plan.bucketed)
    return out


def _mm_weight_grads(grad_out: torch.Tensor, inputs: torch.Tensor, plan: SlotPlan, num_experts: int) -> torch.Tensor:
    """sum over each expert's slots of grad_out_s inputs_s^T: (S, out), (S, in) -> (E, out, in)."""
    grad = grad_out.new_empty(num_experts, grad_out.shape[1], inputs.shape[1])
    for expert, start, count in plan.segments:
        gemm.mm_into(grad_out[start : start + count].t(), inputs[start : start + count], grad[expert],
                     plan.bucketed)
    if len(plan.segments) < num_experts:  # experts without slots get zero gradients
        grad[plan.per_expert == 0] = 0
    return grad


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned data and strides (except the unit stride)."""
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride() if st != 1)
        for t in tensors
    )


def _grouped(inputs: torch.Tensor, weight: torch.Tensor, plan: SlotPlan, transpose: bool,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """torch's grouped_mm version of `_mm_segments` (per-expert loop where its alignment rules fail). grouped_mm
    has no `out=`; the result is copied into `out` only where a caller relies on it (never: callers use the
    returned tensor)."""
    w = weight.transpose(-2, -1) if transpose else weight
    inputs = inputs.contiguous()
    if not _aligned(inputs, w):
        return _mm_segments(inputs, weight, plan, transpose, out)
    return torch._grouped_mm(inputs, w, offs=plan.offsets)


def _grouped_weight_grads(grad_out: torch.Tensor, inputs: torch.Tensor, plan: SlotPlan, num_experts: int) -> torch.Tensor:
    inputs = inputs.contiguous()
    if not _aligned(grad_out, inputs):
        return _mm_weight_grads(grad_out, inputs, plan, num_experts)
    return torch._grouped_mm(grad_out.t(), inputs, offs=plan.offsets)


def _unsort_sum(sorted_rows: torch.Tensor, plan: SlotPlan, num_tokens: int, top_k: int) -> torch.Tensor:
    """Rows in sorted-slot order (S, D) -> per-token sums over the K slots (T, D), deterministic. Unpadded
    plans only (padded ones are summed per segment in `_summed_products`).

    CPU: `index_add_` (sequential, so deterministic, and ~3x cheaper than un-permuting); elsewhere un-permute
    then sum over K, since `index_add_` uses atomics on GPUs."""
    assert plan.rows is None, "a padded plan's rows are summed per segment"
    if sorted_rows.device.type == "cpu":
        out = sorted_rows.new_zeros(num_tokens, sorted_rows.shape[1])
        return out.index_add_(0, plan.tokens, sorted_rows)
    slots = torch.empty_like(sorted_rows).index_copy_(0, plan.order, sorted_rows)  # (S, D) in slot order
    return slots.view(num_tokens, top_k, -1).sum(dim=1)


def _summed_products(inputs: torch.Tensor, weight: torch.Tensor, plan: SlotPlan, transpose: bool, mode: str,
                     num_tokens: int, top_k: int) -> torch.Tensor:
    """Per-token sums over the K slots of the per-expert products (`_mm_segments` then `_unsort_sum`), (S, in) ->
    (T, out). On CPU each expert's product is added into its tokens' rows as it is made (no slot-sized buffer)."""
    if mode == "grouped_mm" or inputs.device.type != "cpu":
        mm = _grouped if mode == "grouped_mm" else _mm_segments
        out_dim = weight.shape[1] if transpose else weight.shape[2]
        rows = mm(inputs, weight, plan, transpose, out=scratch((inputs.shape[0], out_dim), inputs))
        return _unsort_sum(rows, plan, num_tokens, top_k)
    weight = weight.transpose(1, 2) if transpose else weight
    out = inputs.new_zeros(num_tokens, weight.shape[2])
    counts = plan.counts
    for expert, start, rows in plan.segments:
        product = gemm.mm(inputs[start : start + rows], weight[expert], plan.bucketed)  # (rows, out)
        count = counts[expert]  # pad rows, last in a segment, are left out: 0 @ W is not 0 where W is not finite
        out.index_add_(0, plan.row_tokens[start : start + count], product[:count] if count < rows else product)
    return out


def _scaled_rows(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rows (S, D) * scale (S,) per row, into scratch memory."""
    return torch.mul(rows, scale[:, None], out=scratch(rows.shape, rows))


def _gather_rows(source: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
    """source (T, D) -> rows source[t(s)] in row order (R, D), pad rows zero, into scratch memory."""
    out = torch.index_select(source, 0, plan.row_tokens, out=scratch((plan.num_rows, source.shape[1]), source))
    return out if plan.pad_rows is None else out.index_fill_(0, plan.pad_rows, 0)


def _experts_forward(
    hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, top_k_weights: torch.Tensor,
    plan: SlotPlan, mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward math: returns the output (T, H) and what backward needs: gate/up (R, 2I), the activation
    (R, I) and the slot weights (R,), in row order."""
    num_tokens, top_k = top_k_weights.shape
    mm = _grouped if mode == "grouped_mm" else _mm_segments
    slot_weights = plan.to_rows(top_k_weights.reshape(-1).index_select(0, plan.order).to(hidden_states.dtype))  # (R,)
    x_slots = _gather_rows(hidden_states, plan)  # (R, H) scratch
    gate_up = mm(x_slots, gate_up_proj, plan, transpose=True)  # (R, 2I)
    del x_slots  # dead: its scratch memory may be reused
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate).mul_(up)  # (R, I)
    weighted = _scaled_rows(act, slot_weights)  # routing weight before the down projection
    output = _summed_products(weighted, down_proj, plan, True, mode, num_tokens, top_k)  # (T, H)
    return output, gate_up, act, slot_weights


class FusedExpertsFunction(torch.autograd.Function):
    """Routed SwiGLU experts with a hand-written backward (see the module docstring for the math)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: torch.autograd.function.FunctionCtx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        plan: SlotPlan,
        mode: str,
    ) -> torch.Tensor:
        output, gate_up, act, slot_weights = _experts_forward(
            hidden_states, gate_up_proj, down_proj, top_k_weights, plan, mode)
        ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, gate_up, act, slot_weights)
        ctx.plan, ctx.mode, ctx.top_k = plan, mode, top_k_weights.shape[1]
        ctx.weights_dtype = top_k_weights.dtype
        return output

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        grads = experts_backward(grad_output, *ctx.saved_tensors, ctx.plan, ctx.mode, ctx.top_k, ctx.weights_dtype,
                                 ctx.needs_input_grad[:4])
        return (*grads, None, None)


def experts_backward(
    grad_output: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_up: torch.Tensor, act: torch.Tensor, slot_weights: torch.Tensor, plan: SlotPlan, mode: str, top_k: int,
    weights_dtype: torch.dtype, needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """The backward math (module docstring): gradients of hidden_states, gate_up_proj, down_proj and the (T, K)
    routing weights, each None unless `needs` asks for it. gate_up / act / slot_weights in row order."""
    num_tokens, num_experts = hidden_states.shape[0], gate_up_proj.shape[0]
    grouped = mode == "grouped_mm"
    mm = _grouped if grouped else _mm_segments
    weight_grads = _grouped_weight_grads if grouped else _mm_weight_grads
    need_x, need_gu, need_d, need_w = needs

    dy_slots = _gather_rows(grad_output, plan)  # (S, H); strided grads are fine here
    d_weighted = mm(dy_slots, down_proj, plan, transpose=False, out=scratch(act.shape, act))
    grad_down = None
    if need_d:
        grad_down = weight_grads(dy_slots, _scaled_rows(act, slot_weights), plan, num_experts)
    grad_weights = None
    if need_w:
        product = torch.mul(d_weighted, act, out=scratch(act.shape, act))
        d_slot_weights = plan.from_rows(product.sum(dim=-1))  # (S,)
        grad_weights = torch.empty_like(d_slot_weights).index_copy_(0, plan.order, d_slot_weights)
        grad_weights = grad_weights.view(num_tokens, top_k).to(weights_dtype)
    del dy_slots  # dead: its scratch memory may serve the token gather below (never while it is alive)
    grad_x = grad_gate_up = None
    if need_x or need_gu:
        d_act = d_weighted.mul_(slot_weights[:, None])  # (R, I)
        d_gate_up = scratch(gate_up.shape, gate_up)
        inter = act.shape[1]
        swiglu_backward_into(d_gate_up[:, :inter], d_gate_up[:, inter:], d_act, gate_up[:, :inter],
                             gate_up[:, inter:])
        if need_x:
            grad_x = _summed_products(d_gate_up, gate_up_proj, plan, False, mode, num_tokens, top_k)
        if need_gu:
            x_slots = _gather_rows(hidden_states, plan)  # recomputed, not stored
            grad_gate_up = weight_grads(d_gate_up, x_slots, plan, num_experts)
    return grad_x, grad_gate_up, grad_down, grad_weights


def fused_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    mode: str = "loop",
) -> torch.Tensor:
    """Routed SwiGLU experts, (T, H) x (T, K) ids / weights -> (T, H). `mode`: "loop" (one mm per active
    expert) or "grouped_mm" (torch's grouped GEMM)."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"mode={mode!r} is not one of {MATMUL_MODES}")
    inputs = (hidden_states, gate_up_proj, down_proj, top_k_weights)
    num_experts, hidden, inter = down_proj.shape
    mean_rows = top_k_index.numel() // num_experts
    # bucketed segment sizes for oneDNN's kernel cache, where its products pay (the down projection is the
    # smallest of the six per row: at the mean token count it decides whether oneDNN runs at all)
    pad = (mode == "loop" and gemm.onednn_active(hidden_states)
           and mean_rows * hidden * inter >= gemm.MIN_MACS_BUCKETED)
    if records_grad(*inputs):
        return FusedExpertsFunction.apply(*inputs, SlotPlan.build(top_k_index, num_experts, pad), mode)
    if (hidden_states.device.type == "cpu" and top_k_index.numel() <= FEW_SLOTS
            and not torch.is_autocast_enabled("cpu")):
        return _few_slots_forward(*inputs, top_k_index)
    return _experts_forward(*inputs, SlotPlan.build(top_k_index, num_experts, pad), mode)[0]


def _few_slots_forward(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                       top_k_weights: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """Decode: y_t = sum_k w_tk W_d[e] (silu(g) * u), [g; u] = W_gu[e] x_t, one small matmul pair per slot. With
    a handful of slots the sort, gathers and scatter of the general path cost more than the matmuls (~1.7x)."""
    output = torch.zeros_like(hidden_states)
    for token, (experts, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.tolist())):
        row = hidden_states[token : token + 1]  # (1, H)
        for expert, weight in zip(experts, weights):
            gate, up = F.linear(row, gate_up_proj[expert]).chunk(2, dim=-1)
            output[token : token + 1].addmm_(F.silu(gate).mul_(up), down_proj[expert].t(), alpha=weight)
    return output


def supports_fused(experts: nn.Module) -> bool:
    """True when an experts module has the layout these kernels implement: concatenated [gate; up] weights
    (E, 2I, H) / (E, H, I), no biases, no post-expert norm, SiLU, no expert-parallel sentinels."""
    return (
        getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "is_transposed", False)
        and getattr(experts, "is_concatenated", True)
        and not getattr(experts, "has_post_expert_norm", False)
        and getattr(experts, "plain_glu", True)  # SwiGLU proper (hf_moe's other gated units step aside)
        and not getattr(experts, "_is_expert_parallel", False)
        and getattr(getattr(experts, "config", None), "hidden_act", None) in ("silu", "swish")
        and hasattr(experts, "gate_up_proj")
        and hasattr(experts, "down_proj")
    )
