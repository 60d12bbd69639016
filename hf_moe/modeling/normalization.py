"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 and cast back, as Llama and DeepSeek do, and LayerNorm
(Ba et al. 2016) with or without bias (Phi-3.5-MoE, DBRX), chosen by `config.norm_type` (`build_norm`).

    y = w * x * r,   r = (mean(x^2) + eps)^-1/2                                  (Zhang & Sennrich, eq. 4)
    y = w * (x - mean(x)) / sqrt(var(x) + eps) [+ b]                                      (Ba et al., eq. 4)

The "rms_norm" kernel (hf_moe.kernels, with a hand-written backward) takes the RMSNorm calls it is eligible
for; LayerNorm is torch's own.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import MoEConfig
from .kernel_hooks import run_kernel


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistics in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = run_kernel("rms_norm", self, hidden_states)
        if out is not None:
            return out
        input_dtype = hidden_states.dtype  # the eager math of transformers' Llama/DeepSeek RMSNorm
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def build_norm(config: MoEConfig, size: int | None = None) -> nn.Module:
    """The decoder's norm of `config.norm_type` over `size` features (hidden_size by default), eps rms_norm_eps."""
    size = config.hidden_size if size is None else size
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(size, eps=config.rms_norm_eps, bias=config.norm_bias)
    return RMSNorm(size, eps=config.rms_norm_eps)
