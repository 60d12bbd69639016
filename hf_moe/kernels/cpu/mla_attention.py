"""MLA attention over token-major projections with a hand-written backward (CPU training and prefill).

For one head h (DeepSeek-V2 eqs. 13-19, the decoupled rotary key shared by all heads):

    S_h = scale * (Qn_h Kn_h^T + rope(Qr_h) rope(k_r)^T) + bias        P_h = softmax(S_h)        O_h = P_h V_h

The projections come out token-major, q (B, T, h, dn + dr) and kv (B, S, h, dn + dv); the generic path
splits, rotates and concatenates them into head-major (B, h, T, dn + dr) queries and keys, copies the values,
transposes the output back and, in backward, undoes each step with more copies, zero-filled slice gradients
and sums. Here every matmul reads the token-major tensors in place through strided (heads, tokens, width)
views, the rotary part of the score is a second product against the one shared k_r, the output and the
gradients of q and kv are written once, in the layout the projections produce and consume. (Products are
written to fresh blocks and then copied into those strided layouts: torch's CPU bmm multiplies one matrix at
a time when its output is not contiguous.) Causal queries run
in the row blocks of `attention.attention_blocks`.

Selected by name only: the "mla_attention" kernel takes MLA's expanded (non-absorbed) calls when the model's
attention implementation is "hf_moe_sdpa" (hf_moe's default) and the explicit kernel wins
(`attention.explicit_wins`); "sdpa", "eager" and every other name run transformers' function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ...modeling.attention import HF_MOE_ATTENTION
from ...modeling.kernel_hooks import project
from ...modeling.rotary import half_angles, rotate_into
from .attention import additive_mask, attention_blocks, block_scores, explicit_wins, mask_causal_block_
from .rope import unrotate_into


class MLAAttentionFunction(torch.autograd.Function):
    """See the module docstring. Inputs: q (B, T, h, dn + dr) with the rotary part not yet rotated, kv (B, S,
    h, dn + dv), the rotated shared key k_rope (B, S, dr), the query angles cos/sin (B, T, 1, dr / 2), an
    additive bias (B, 1 or h, T, S) or None for causal (T == S). Returns O (B, T, h, dv)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None, nope_dim: int, scale: float,
        interleaved: bool,
    ) -> torch.Tensor:
        batch, length, heads, _ = q.shape
        kv_length, value_dim = kv.shape[1], kv.shape[-1] - nope_dim
        q_rope = q.new_empty(*q.shape[:-1], q.shape[-1] - nope_dim)  # (B, T, h, dr), rotated
        rotate_into(q_rope, q[..., nope_dim:], cos, sin, interleaved)
        output = q.new_empty(batch, length, heads, value_dim)
        probs = []
        for b in range(batch):
            q_nope_b, q_rope_b = q[b, :, :, :nope_dim].transpose(0, 1), q_rope[b].transpose(0, 1)  # (h, T, ·)
            k_nope_b, value_b = kv[b, :, :, :nope_dim].transpose(0, 1), kv[b, :, :, nope_dim:].transpose(0, 1)
            k_rope_t = k_rope[b].t()  # (dr, S)
            out_b = output[b].transpose(0, 1)  # (h, T, dv)
            for start, end, kv_end in attention_blocks(length, kv_length, bias is None):
                block_bias = None if bias is None else bias[b, :, start:end].expand(heads, -1, -1)
                scores = block_scores(q_nope_b[:, start:end], k_nope_b[:, :kv_end].transpose(1, 2), block_bias,
                                      scale)  # (h, rows, keys)
                scores.baddbmm_(q_rope_b[:, start:end], k_rope_t[:, :kv_end].expand(heads, -1, -1), alpha=scale)
                if bias is None:
                    mask_causal_block_(scores, start)
                probs.append(torch.softmax(scores, dim=-1))
                out_b[:, start:end] = torch.bmm(probs[-1], value_b[:, :kv_end])
        ctx.save_for_backward(q, kv, k_rope, q_rope, cos, sin, *probs)
        ctx.nope_dim, ctx.scale, ctx.interleaved, ctx.causal = nope_dim, scale, interleaved, bias is None
        return output

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        q, kv, k_rope, q_rope, cos, sin, *probs = ctx.saved_tensors
        nope_dim, scale = ctx.nope_dim, ctx.scale
        batch, length, heads, _ = q.shape
        kv_length = kv.shape[1]
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        grad_q_rope = torch.empty_like(q_rope)
        grad_kv = torch.empty_like(kv, memory_format=torch.contiguous_format)
        grad_k_rope = torch.empty_like(k_rope, memory_format=torch.contiguous_format)
        blocks = attention_blocks(length, kv_length, ctx.causal)
        for b in range(batch):
            q_nope_b, q_rope_b = q[b, :, :, :nope_dim].transpose(0, 1), q_rope[b].transpose(0, 1)
            k_nope_b, value_b = kv[b, :, :, :nope_dim].transpose(0, 1), kv[b, :, :, nope_dim:].transpose(0, 1)
            grad_out_b = grad_output[b].transpose(0, 1)  # (h, T, dv)
            grad_q_nope_b, grad_q_rope_b = grad_q[b, :, :, :nope_dim].transpose(0, 1), grad_q_rope[b].transpose(0, 1)
            grad_k_nope_b = grad_kv[b, :, :, :nope_dim].transpose(0, 1)
            grad_value_b = grad_kv[b, :, :, nope_dim:].transpose(0, 1)
            block_probs = probs[b * len(blocks) : (b + 1) * len(blocks)]
            # the last block reads every key: it writes the key/value gradients, earlier blocks add to a prefix
            for index, ((start, end, kv_end), p) in enumerate(reversed(list(zip(blocks, block_probs)))):
                grad_block = grad_out_b[:, start:end]  # (h, rows, dv)
                grad_probs = torch.bmm(grad_block, value_b[:, :kv_end].transpose(1, 2))  # (h, rows, keys)
                grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, p, -1, p.dtype)
                grad_q_nope_b[:, start:end] = torch.bmm(grad_scores, k_nope_b[:, :kv_end])
                grad_q_rope_b[:, start:end] = torch.bmm(grad_scores, k_rope[b, :kv_end].expand(heads, -1, -1))
                rows_first = grad_scores.reshape(-1, kv_end).t()  # (keys, h * rows): heads share k_rope
                q_rope_rows = q_rope_b[:, start:end].reshape(-1, q_rope.shape[-1])  # (h * rows, dr)
                if index == 0:
                    grad_value_b[:, :kv_end] = torch.bmm(p.transpose(1, 2), grad_block)
                    grad_k_nope_b[:, :kv_end] = torch.bmm(grad_scores.transpose(1, 2), q_nope_b[:, start:end])
                    torch.mm(rows_first, q_rope_rows, out=grad_k_rope[b, :kv_end])
                else:
                    grad_value_b[:, :kv_end] += torch.bmm(p.transpose(1, 2), grad_block)
                    grad_k_nope_b[:, :kv_end] += torch.bmm(grad_scores.transpose(1, 2), q_nope_b[:, start:end])
                    grad_k_rope[b, :kv_end].addmm_(rows_first, q_rope_rows)
        unrotate_into(grad_q[..., nope_dim:], grad_q_rope, cos, sin, ctx.interleaved)
        grad_q.mul_(scale)
        grad_kv[..., :nope_dim].mul_(scale)
        return grad_q, grad_kv, grad_k_rope.mul_(scale), None, None, None, None, None, None


def mla_attention(
    q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    attention_mask: torch.Tensor | None, nope_dim: int, scale: float, interleaved: bool,
) -> torch.Tensor:
    """q (B, T, h, dn + dr) un-rotated, kv (B, S, h, dn + dv), rotated k_rope (B, S, dr), cos/sin tables (B, T,
    dr) = cat(freqs, freqs); mask bool (True = attend) or additive, (B, 1, T, >= S). Without a mask the
    semantics are sdpa's is_causal, as transformers uses it: causal for T > 1 (keys beyond the T-th, which only
    an empty static cache leaves, are unused), every key for T == 1. Returns O (B, T, h, dv)."""
    length, kv_length = q.shape[1], kv.shape[1]
    bias = None
    if attention_mask is not None:
        bias = additive_mask(attention_mask, kv_length, q.dtype).expand(q.shape[0], -1, length, kv_length)
    elif length == 1:
        bias = q.new_zeros(1, 1, 1, 1).expand(q.shape[0], 1, 1, kv_length)
    elif kv_length > length:
        kv, k_rope = kv[:, :length], k_rope[:, :length]
    cos, sin = half_angles(cos, sin)
    return MLAAttentionFunction.apply(q, kv, k_rope, cos.unsqueeze(2), sin.unsqueeze(2), bias, nope_dim, scale,
                                      interleaved)


def mla_attention_kernel(
    module: nn.Module, queries: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None, dropout: float,
    **kwargs: object,
) -> torch.Tensor | None:
    """The "mla_attention" kernel: queries (B, h, T, dn + dr) un-rotated, latent (B, 1, S, r), rotated k_pe
    (B, 1, S, dr) -> O (B, T, h, dv) through `mla_attention` (kv_b_proj applied token-major), or None where it is
    not selected (see the module docstring)."""
    batch, heads, length, _ = queries.shape
    if module.config._attn_implementation != HF_MOE_ATTENTION or not explicit_wins(
            queries, module.v_head_dim, batch * heads * length * latent.shape[2], dropout, **kwargs):
        return None
    nope = module.qk_nope_head_dim
    kv = project(module.kv_b_proj, latent.squeeze(1)).view(batch, -1, heads, nope + module.v_head_dim)
    cos, sin = position_embeddings
    return mla_attention(queries.transpose(1, 2), kv, k_pe.squeeze(1), cos, sin, attention_mask, nope,
                         module.scaling, module.config.rope_interleave)
