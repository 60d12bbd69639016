"""The rotary embedding's rotation with a hand-written backward, for CPU fp32 training.

For rotary pairs (x1, x2) at angle theta (RoFormer eq. 13-14), output half-split as the reference's
(`hf_moe.modeling.rotary.apply_rope`):

    y1 = x1 cos - x2 sin        dx1 =  dy1 cos + dy2 sin
    y2 = x2 cos + x1 sin        dx2 = -dy1 sin + dy2 cos

The Function writes y and dx once each and saves only the angles, instead of autograd's slices, products and
concatenation (and their zero-filled gradients).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...modeling.rotary import rotary_pairs, rotate_into, rotated_like
from ..eligible import eligible


def unrotate_into(out: torch.Tensor, grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool) -> None:
    """The backward of `rotate_into`: out (x's layout) = grad (half-split) rotated by minus the angles."""
    dy1, dy2 = rotary_pairs(grad, False)
    dx1, dx2 = rotary_pairs(out, interleaved)
    torch.mul(dy1, cos, out=dx1).addcmul_(dy2, sin)
    torch.mul(dy2, cos, out=dx2).addcmul_(dy1, sin, value=-1)


class RotaryFunction(torch.autograd.Function):
    """y = rotate(x) by the angles whose cos/sin (half width) are given; backward rotates by minus the angles."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, cos: torch.Tensor,  # noqa: D102
                sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        out = rotated_like(x, cos)
        rotate_into(out, x, cos, sin, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.input_dtype = interleaved, x.dtype
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:  # noqa: D102
        cos, sin = ctx.saved_tensors
        grad_x = torch.empty_like(grad_output, memory_format=torch.contiguous_format)
        unrotate_into(grad_x, grad_output, cos, sin, ctx.interleaved)
        return grad_x.to(ctx.input_dtype), None, None, None


def rope_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """The "rope" kernel: x (B, heads, T, d), half-width angles (B, 1, T, d/2). `RotaryFunction` for an fp32
    CPU call that autograd records on x alone (the angles are constants), else None."""
    if not eligible(x, cos, sin, training=True) or cos.requires_grad or sin.requires_grad:
        return None
    return RotaryFunction.apply(x, cos, sin, interleaved)
