"""Scaled dot-product attention with an explicit softmax and a hand-written backward, for CPU training.

    S = scale * Q K^T + bias        P = softmax(S)        O = P V              (Vaswani et al. 2017, eq. 1)
    dV = P^T dO    dP = dO V^T    dS = P * (dP - rowsum(dP * P))    dQ = scale * dS K    dK = scale * dS^T Q

Why: on CPU, torch's fused flash kernel needs the value width to equal the query/key width (MLA's is not:
qk_head_dim = nope + rope != v_head_dim), else `scaled_dot_product_attention` takes its math path: a separate
scale, a mask pass, a "safe" softmax with three extra passes for fully-masked rows, autograd saving the scores
as well as the probabilities, and every masked-out block of a causal product computed anyway. This kernel folds
scale and mask into one `baddbmm`, skips the key blocks a causal query block cannot see, keeps only P for
backward and runs the backward as four bmm plus one softmax backward. Causal forward+backward, 4 x 8 heads,
head width 96, measured on the 2-core CPU of benchmarks/: against the math path (value width 64) 1.8x at 256
tokens and 3.1x at 1024; against flash (value width 96) 1.4x at 256, even at 1024, 0.5x at 2048, hence the
size limit below for same-width attention. (MLA itself runs `mla_attention`, which builds on these blocks.)

`hf_moe_sdpa_attention` is registered in transformers' attention interface as "hf_moe_sdpa" (hf_moe models'
default, `attn_implementation=None` or "auto"): sdpa's signature and semantics; it takes this kernel where it
wins (CPU, fp32/fp64, no autocast, no dropout, and either an MLA-style value width that keeps torch on its
math path or a probability tensor small enough that storing it beats re-computing it) and hands every other
call to the "sdpa" function registered in transformers' attention interface, unchanged. An explicit
`attn_implementation="sdpa"` never comes here: it is transformers' sdpa.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..eligible import eligible

EXPLICIT_MAX_PROBS = 16 * 2**20  # elements of P (batch * heads * T * S) above which same-width attention uses flash
CAUSAL_BLOCK = 128  # query rows per block of causal attention: block i reads keys [0, end of block i) only
_triangles: dict[tuple, torch.Tensor] = {}


def causal_triangle(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, rows) additive mask, -inf above the diagonal: a causal block's square of keys [start, end). One
    small table per dtype and device (at most CAUSAL_BLOCK square), read, never written."""
    key = (dtype, device)
    table = _triangles.get(key)
    if table is None or table.shape[0] < rows:
        table = _triangles[key] = torch.full((rows, rows), float("-inf"), dtype=dtype, device=device).triu_(1)
    return table[:rows, :rows]


def block_scores(query: torch.Tensor, key_t: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """scale * query @ key_t (+ bias), (N, rows, keys); without a bias there is nothing to copy in (beta=0)."""
    if bias is None:
        bias, beta = query.new_empty(1, 1, 1).expand(query.shape[0], query.shape[1], key_t.shape[2]), 0.0
    else:
        beta = 1.0
    return torch.baddbmm(bias, query, key_t, beta=beta, alpha=scale)


def mask_causal_block_(scores: torch.Tensor, start: int) -> torch.Tensor:
    """Causal block [start, end) of queries reads keys [0, end): only its last `rows` keys need the triangle."""
    rows = scores.shape[-2]
    scores[..., start : start + rows] += causal_triangle(rows, scores.dtype, scores.device)
    return scores


class SoftmaxAttentionFunction(torch.autograd.Function):
    """O = softmax(scale * Q K^T + bias) V over flattened (batch * heads), with a hand-written backward.

    `bias` None means causal: queries run in blocks of `CAUSAL_BLOCK` rows and block [s, e) multiplies only
    keys [0, e), which skips the (almost) fully masked upper blocks: (n + 1) / 2n of the work for n blocks.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: torch.autograd.function.FunctionCtx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        bias: torch.Tensor | None, scale: float,
    ) -> torch.Tensor:
        # query (N, T, d), key (N, S, d), value (N, S, dv), bias (N, T, S) or None (causal, T == S)
        length = query.shape[1]
        output = query.new_empty(query.shape[0], length, value.shape[-1])  # (N, T, dv)
        probs = []
        for start, end, kv_end in attention_blocks(length, key.shape[1], bias is None):
            scores = block_scores(query[:, start:end], key[:, :kv_end].transpose(1, 2), bias, scale)
            if bias is None:
                mask_causal_block_(scores, start)
            probs.append(torch.softmax(scores, dim=-1))  # (N, rows, keys)
            output[:, start:end] = torch.bmm(probs[-1], value[:, :kv_end])  # (bmm's out= must be contiguous)
        ctx.save_for_backward(query, key, value, *probs)
        ctx.scale, ctx.causal = scale, bias is None
        return output

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        query, key, value, *probs = ctx.saved_tensors
        grad_query, grad_key, grad_value = torch.empty_like(query), None, None
        blocks = attention_blocks(query.shape[1], key.shape[1], ctx.causal)
        # the last block reads every key: it writes dK, dV whole; earlier (shorter) blocks add to their prefix
        for (start, end, kv_end), block_probs in reversed(list(zip(blocks, probs))):
            grad_block = grad_output[:, start:end]  # (N, rows, dv)
            block_grad_value = torch.bmm(block_probs.transpose(1, 2), grad_block)  # (N, keys, dv)
            grad_probs = torch.bmm(grad_block, value[:, :kv_end].transpose(1, 2))  # (N, rows, keys)
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, block_probs, -1, block_probs.dtype)
            grad_query[:, start:end] = torch.bmm(grad_scores, key[:, :kv_end])
            block_grad_key = torch.bmm(grad_scores.transpose(1, 2), query[:, start:end])  # (N, keys, d)
            if grad_key is None:
                grad_key, grad_value = block_grad_key, block_grad_value
            else:  # accumulating into a strided prefix with baddbmm_ would fall back to one addmm per matrix
                grad_key[:, :kv_end] += block_grad_key
                grad_value[:, :kv_end] += block_grad_value
        return grad_query.mul_(ctx.scale), grad_key.mul_(ctx.scale), grad_value, None, None


def attention_blocks(length: int, kv_length: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query row, end row, keys read) of every block: one block unless causal."""
    if not causal:
        return [(0, length, kv_length)]
    return [(start, min(start + CAUSAL_BLOCK, length), min(start + CAUSAL_BLOCK, length))
            for start in range(0, length, CAUSAL_BLOCK)]


def additive_mask(attention_mask: torch.Tensor, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask cut to the keys present, as an additive bias: bool masks (True = attend) become 0 / the most
    negative finite value (as eager attention: rows without a visible key stay finite, no NaN)."""
    attention_mask = attention_mask[..., :kv_length]
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill_(
            ~attention_mask, torch.finfo(dtype).min)
    return attention_mask.to(dtype)


def explicit_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scale: float, is_causal: bool,
) -> torch.Tensor:
    """query (B, h, T, d), key (B, h, S, d), value (B, h, S, dv); mask bool (True = attend) or additive,
    broadcastable to (B, h, T, S); is_causal (no mask, T == S) masks keys after each query. Returns (B, h, T, dv)."""
    batch, heads, length, dim = query.shape
    kv_length = key.shape[2]
    bias = None
    if attention_mask is not None:
        bias = additive_mask(attention_mask, kv_length, query.dtype)
        bias = bias.expand(batch, heads, length, kv_length).reshape(-1, length, kv_length)
    elif not is_causal:
        bias = query.new_zeros(1, 1, 1).expand(batch * heads, length, kv_length)
    output = SoftmaxAttentionFunction.apply(
        query.reshape(batch * heads, length, dim), key.reshape(batch * heads, kv_length, dim),
        value.reshape(batch * heads, kv_length, value.shape[-1]), bias, scale)
    return output.view(batch, heads, length, -1)


def explicit_wins(query: torch.Tensor, value_dim: int, probs: int, dropout: float, **kwargs: object) -> bool:
    """Where the explicit kernel is the faster exact choice (see the module docstring): CPU, fp32/fp64, no dropout
    or extras, and either a value width that keeps torch on its math path or at most `EXPLICIT_MAX_PROBS`
    probabilities (batch * heads * T * S) to store."""
    if (not eligible(query, dtypes=(torch.float32, torch.float64)) or dropout > 0
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions")):
        return False
    return value_dim != query.shape[-1] or probs <= EXPLICIT_MAX_PROBS


def hf_moe_sdpa_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """"hf_moe_sdpa": transformers' `sdpa` attention signature and semantics, the explicit kernel where it wins
    (see the module docstring); returns (B, T, heads, dv) and no weights."""
    probs = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
    if not explicit_wins(query, value.shape[-1], probs, dropout, **kwargs):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = length > 1 and attention_mask is None and causal
    if causal and key.shape[2] > length:  # as transformers: is_causal is top-left aligned, extra keys are unused
        key, value = key[:, :, :length], value[:, :, :length]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = explicit_attention(query, key, value, attention_mask, scale, causal)
    return output.transpose(1, 2).contiguous(), None
