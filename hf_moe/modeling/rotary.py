"""Rotary position embeddings (RoPE, Su et al. 2021): cos/sin tables and the rotation. Frequencies come from
transformers' `ROPE_INIT_FUNCTIONS` (default, yarn, llama3...).

For rotary pairs (x1, x2) at angle theta (RoFormer eq. 13-14):

    y1 = x1 cos - x2 sin        dx1 =  dy1 cos + dy2 sin
    y2 = x2 cos + x1 sin        dx2 = -dy1 sin + dy2 cos

Pairs are the two halves of the rotary width (Llama, Qwen, "half-split") or neighbours (x0, x1), (x2, x3)...
(DeepSeek checkpoints, "interleaved"); the output is always written half-split, which leaves every q.k dot
product unchanged because queries and keys are permuted alike. Without a graph the rotation is written into
one output tensor; the "rope" kernel (hf_moe.kernels, a hand-written backward) takes the training calls it is
eligible for.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration import MoEConfig
from .kernel_hooks import run_kernel


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE (Su et al. 2021) for the rotary width `config.rotary_dim` (the whole head, or its
    first `partial_rotary_factor` part)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[
            self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MoEConfig, **_: object) -> tuple[torch.Tensor, float]:
        """theta_j = base^(-2j/d) for j < d/2 (RoFormer eq. 15)."""
        base = config.rope_parameters["rope_theta"]
        dim = config.rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotary_pairs(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x1, x2) members of every rotary pair: neighbours if interleaved, else the two halves."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
    """out (half-split) = x rotated by the angles; cos/sin hold the half width and broadcast against x's pairs."""
    x1, x2 = rotary_pairs(x, interleaved)
    y1, y2 = rotary_pairs(out, False)
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin)


def rotated_like(x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """The output tensor of rotating x: x's shape broadcast against the angles, and the dtype x * cos has (as in
    the reference x * cos + rotate_half(x) * sin, e.g. fp32 for bf16 queries under autocast)."""
    shape = torch.broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1]))
    return torch.empty(shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)


def half_angles(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, d) = cat(freqs, freqs) -> their first halves (B, T, d/2)."""
    half = cos.shape[-1] // 2
    return cos[..., :half], sin[..., :half]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, heads, T, d) by the position angles; cos/sin are (B, T, r) = cat(freqs, freqs). With a rotary
    width r < d (partial rotary, GPT-NeoX/GLM) only the first r dims rotate and the rest pass unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        x_rot, x_pass = x[..., :rotary], x[..., rotary:]
        return torch.cat((apply_rope(x_rot, cos, sin, interleaved), x_pass.to(torch.promote_types(x.dtype, cos.dtype))),
                         dim=-1)
    cos, sin = half_angles(cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d/2)
    out = run_kernel("rope", x, cos, sin, interleaved)
    if out is not None:
        return out
    traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # out= into views breaks a graph
    if traced or (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)):
        x1, x2 = rotary_pairs(x, interleaved)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = rotated_like(x, cos)  # no graph: one output, no temporaries
    rotate_into(out, x, cos, sin, interleaved)
    return out
