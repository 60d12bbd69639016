"""Triton backend for routed SwiGLU experts, forward and backward (same math as `fused.py`).

Three kernels over token-slots sorted by expert (see `fused.SlotPlan`):

- `_gate_up_swiglu_kernel`: h_s = w_s * silu(x_t(s) W_g[e]^T) * (x_t(s) W_u[e]^T), the token gather fused
  into the A-tile load and SwiGLU plus the routing weight fused into the epilogue; also stores gate/up.
- `_segment_gemm_kernel`: C[rows] = A[rows] @ B[e] per expert segment, with an optional row gather of A
  (gradient of the output, read per slot) and an optional row scatter of C (back to slot order).
- `_segment_wgrad_kernel`: dW[e] = A[seg]^T @ B[seg] reduced over an expert's slots (weight gradients),
  with optional row gathers; experts without slots get zeros.

Work is split into tiles of BLOCK_M sorted slots that never straddle two experts; the tile table is built
on the host from the per-expert counts. Accumulation is fp32; fp32 inputs use IEEE dots (no TF32) so the
results match the eager reference tightly. On CPU the kernels run under `TRITON_INTERPRET=1` (slow:
correctness tests only); they use only builtins (no `tl.zeros`/`tl.sigmoid`, which are themselves jit
functions), so the interpreter works even when triton was imported before the variable was set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused import SlotPlan

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast() -> bool:
    """Dots in fp32 under the interpreter, whose tl.dot mis-reads bf16/fp16 tiles (triton 3.x)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, rows_ptr, w_ptr, weights_ptr, gu_ptr, h_ptr, tile_expert_ptr, tile_start_ptr, seg_end_ptr,
    hidden, inter,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_gum, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(seg_end_ptr + expert)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tokens = tl.load(rows_ptr + rows, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        b_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=b_mask, other=0.0)
        b_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wk, mask=b_mask, other=0.0)
        if UPCAST:
            a, b_gate, b_up = a.to(tl.float32), b_gate.to(tl.float32), b_up.to(tl.float32)
        acc_gate += tl.dot(a, b_gate, input_precision=PRECISION)
        acc_up += tl.dot(a, b_up, input_precision=PRECISION)
    weight = tl.load(weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up * weight[:, None]  # silu(gate) * up * w
    out_mask = row_mask[:, None] & col_mask[None, :]
    gu_offsets = rows[:, None] * stride_gum + cols[None, :]
    tl.store(gu_ptr + gu_offsets, acc_gate.to(gu_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gu_ptr + gu_offsets + inter, acc_up.to(gu_ptr.dtype.element_ty), mask=out_mask)
    tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _segment_gemm_kernel(
    a_ptr, a_rows_ptr, b_ptr, c_ptr, c_rows_ptr, tile_expert_ptr, tile_start_ptr, seg_end_ptr,
    n_cols, k_dim,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(seg_end_ptr + expert)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    a_rows = rows
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    b_base = b_ptr + expert * stride_be
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_dim
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        a = a.to(b.dtype)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    c_rows = rows
    if SCATTER_C:
        c_rows = tl.load(c_rows_ptr + rows, mask=row_mask, other=0)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _segment_wgrad_kernel(
    a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, c_ptr, seg_start_ptr, seg_end_ptr,
    m_dim, n_dim,
    stride_am, stride_ak, stride_bm, stride_bk, stride_ce, stride_cm, stride_cn,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # C[e] (m_dim, n_dim) = sum over the slots s of expert e of A[s, :]^T B[s, :]
    expert = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < m_dim
    n_mask = ns < n_dim
    start = tl.load(seg_start_ptr + expert)
    end = tl.load(seg_end_ptr + expert)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_K):
        slots = s0 + tl.arange(0, BLOCK_K)
        s_mask = slots < end
        a_rows = slots
        b_rows = slots
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + slots, mask=s_mask, other=0)
        if GATHER_B:
            b_rows = tl.load(b_rows_ptr + slots, mask=s_mask, other=0)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ms[:, None] * stride_ak,
                      mask=m_mask[:, None] & s_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + ns[None, :] * stride_bk,
                    mask=s_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        a_t = a_t.to(b.dtype)
        if UPCAST:
            a_t, b = a_t.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a_t, b, input_precision=PRECISION)
    tl.store(c_ptr + expert * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


class _Tiles:
    """Tile table: for every BLOCK_M-slot tile, its expert and first sorted slot; segment bounds per expert."""

    def __init__(self, plan: SlotPlan, device: torch.device) -> None:
        experts, starts, start = [], [], 0
        for expert, count in enumerate(plan.counts):
            for tile_start in range(start, start + count, BLOCK_M):
                experts.append(expert)
                starts.append(tile_start)
            start += count
        self.count = len(experts)
        self.expert = torch.tensor(experts, dtype=torch.int32, device=device)
        self.start = torch.tensor(starts, dtype=torch.int32, device=device)
        self.seg_end = plan.offsets.to(device=device, dtype=torch.int32)
        self.seg_start = self.seg_end - plan.per_expert.to(device=device, dtype=torch.int32)


def _segment_gemm(a: torch.Tensor, a_rows: torch.Tensor | None, b: torch.Tensor, b_transposed: bool,
                  out: torch.Tensor, out_rows: torch.Tensor | None, tiles: _Tiles) -> torch.Tensor:
    """out[out_rows or s] = a[a_rows or s] @ (b[e]^T if b_transposed else b[e]) for every sorted slot s."""
    k_dim, n_cols = (b.shape[2], b.shape[1]) if b_transposed else (b.shape[1], b.shape[2])
    stride_bk, stride_bn = (b.stride(2), b.stride(1)) if b_transposed else (b.stride(1), b.stride(2))
    if tiles.count:
        grid = (tiles.count, triton.cdiv(n_cols, BLOCK_N))
        _segment_gemm_kernel[grid](
            a, a_rows if a_rows is not None else tiles.start, b, out, out_rows if out_rows is not None else tiles.start,
            tiles.expert, tiles.start, tiles.seg_end, n_cols, k_dim,
            a.stride(0), a.stride(1), b.stride(0), stride_bk, stride_bn, out.stride(0), out.stride(1),
            GATHER_A=a_rows is not None, SCATTER_C=out_rows is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=_precision(b.dtype), UPCAST=_upcast(),
        )
    return out


def _segment_wgrad(a: torch.Tensor, a_rows: torch.Tensor | None, b: torch.Tensor, b_rows: torch.Tensor | None,
                   out: torch.Tensor, tiles: _Tiles) -> torch.Tensor:
    """out[e] = sum_{s in seg(e)} a[a_rows(s)]^T b[b_rows(s)], out (E, M, N)."""
    num_experts, m_dim, n_dim = out.shape
    grid = (num_experts, triton.cdiv(m_dim, BLOCK_M), triton.cdiv(n_dim, BLOCK_N))
    _segment_wgrad_kernel[grid](
        a, a_rows if a_rows is not None else tiles.seg_end, b, b_rows if b_rows is not None else tiles.seg_end, out,
        tiles.seg_start, tiles.seg_end, m_dim, n_dim,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=a_rows is not None, GATHER_B=b_rows is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=_precision(b.dtype), UPCAST=_upcast(),
    )
    return out


class TritonExpertsFunction(torch.autograd.Function):
    """Routed SwiGLU experts in Triton kernels; saves gate/up (S, 2I) and the weighted activation (S, I)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: torch.autograd.function.FunctionCtx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        plan: SlotPlan,
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_weights.shape
        num_slots, inter = plan.order.shape[0], down_proj.shape[2]
        dtype, device = hidden_states.dtype, hidden_states.device
        tiles = _Tiles(plan, device)
        slot_weights = top_k_weights.reshape(-1).index_select(0, plan.order).to(dtype).contiguous()  # (S,)
        gate_up = torch.empty(num_slots, 2 * inter, dtype=dtype, device=device)
        weighted = torch.empty(num_slots, inter, dtype=dtype, device=device)
        if tiles.count:
            grid = (tiles.count, triton.cdiv(inter, BLOCK_N))
            _gate_up_swiglu_kernel[grid](
                hidden_states, plan.tokens, gate_up_proj, slot_weights, gate_up, weighted,
                tiles.expert, tiles.start, tiles.seg_end, hidden_states.shape[1], inter,
                hidden_states.stride(0), hidden_states.stride(1), gate_up_proj.stride(0), gate_up_proj.stride(1),
                gate_up_proj.stride(2), gate_up.stride(0), weighted.stride(0),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=_precision(gate_up_proj.dtype), UPCAST=_upcast(),
            )
        y_slots = hidden_states.new_empty(num_slots, hidden_states.shape[1])  # in slot order (t * K + k)
        _segment_gemm(weighted, None, down_proj, True, y_slots, plan.order, tiles)
        ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, gate_up, weighted, slot_weights)
        ctx.plan, ctx.tiles, ctx.top_k, ctx.weights_dtype = plan, tiles, top_k, top_k_weights.dtype
        return y_slots.view(num_tokens, top_k, -1).sum(dim=1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        hidden_states, gate_up_proj, down_proj, gate_up, weighted, slot_weights = ctx.saved_tensors
        plan, tiles, top_k = ctx.plan, ctx.tiles, ctx.top_k
        num_tokens, num_slots = hidden_states.shape[0], gate_up.shape[0]
        need_x, need_gu, need_d, need_w = ctx.needs_input_grad[:4]
        # d(w a)_s = W_d[e]^T dy_t(s): the gradient rows are gathered inside the kernel
        d_weighted = _segment_gemm(grad_output, plan.tokens, down_proj, False,
                                   gate_up.new_empty(num_slots, down_proj.shape[2]), None, tiles)
        grad_down = None
        if need_d:
            grad_down = _segment_wgrad(grad_output, plan.tokens, weighted, None,
                                       torch.empty_like(down_proj, dtype=torch.float32), tiles).to(down_proj.dtype)
        gate, up = gate_up.float().chunk(2, dim=-1)
        d_weighted = d_weighted.float()
        grad_weights = None
        if need_w:  # dw_s = <d(w a)_s, a_s>, a_s = silu(g_s) u_s
            d_slot = (d_weighted * F.silu(gate) * up).sum(dim=-1)
            grad_weights = torch.empty_like(d_slot).index_copy_(0, plan.order, d_slot)
            grad_weights = grad_weights.view(num_tokens, top_k).to(ctx.weights_dtype)
        grad_x = grad_gate_up = None
        if need_x or need_gu:
            d_act = d_weighted * slot_weights.float()[:, None]
            d_gate_up = torch.cat((torch.ops.aten.silu_backward(d_act * up, gate), d_act * F.silu(gate)), dim=-1)
            d_gate_up = d_gate_up.to(gate_up.dtype)
            if need_x:
                dx_slots = hidden_states.new_empty(num_slots, hidden_states.shape[1])
                _segment_gemm(d_gate_up, None, gate_up_proj, False, dx_slots, plan.order, tiles)
                grad_x = dx_slots.view(num_tokens, top_k, -1).sum(dim=1)
            if need_gu:
                grad_gate_up = _segment_wgrad(d_gate_up, None, hidden_states, plan.tokens,
                                              torch.empty_like(gate_up_proj, dtype=torch.float32), tiles)
                grad_gate_up = grad_gate_up.to(gate_up_proj.dtype)
        return grad_x, grad_gate_up, grad_down, grad_weights, None


def triton_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts with Triton kernels: (T, H) x (T, K) ids / weights -> (T, H). On CPU this needs
    TRITON_INTERPRET=1 set before this module is imported."""
    plan = SlotPlan.build(top_k_index, gate_up_proj.shape[0])
    return TritonExpertsFunction.apply(hidden_states, gate_up_proj, down_proj, top_k_weights, plan)
