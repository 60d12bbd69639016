"""Multi-token prediction modules (DeepSeek-V3 §2.2, eqs. 21-25).

Module k combines the embedding of token i+k with the representation h^{k-1}_i of the previous depth:
h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding first, as the released checkpoints store
eh_proj), runs one transformer block, and predicts t_{i+k+1} through `norm` and the shared output head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .configuration import MoEConfig
from .decoder import DecoderLayer
from .kernel_hooks import project
from .normalization import RMSNorm


class MTPModule(nn.Module):
    """One prediction depth. `block` is a full decoder layer (MoE when the model has routed experts)."""

    def __init__(self, config: MoEConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, config.num_hidden_layers + depth, moe=config.n_routed_experts > 0)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        previous_hidden: torch.Tensor,
        future_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        """previous_hidden h^{k-1} (B, T, H), future_embeds Emb(t_{i+k}) (B, T, H) -> h^k (B, T, H), routing.
        `cache` (decoding only) holds the block's keys/values under its layer index."""
        merged = project(self.eh_proj, torch.cat((self.enorm(future_embeds), self.hnorm(previous_hidden)), dim=-1))
        hidden, routing, _ = self.block(merged, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                        cache=cache, token_mask=token_mask)
        return hidden, routing


def shift_left(tensor: torch.Tensor, steps: int, fill: float | int) -> torch.Tensor:
    """tensor[:, i] <- tensor[:, i + steps]; the last `steps` positions get `fill`. Works on (B, T, ...)."""
    shifted = torch.roll(tensor, shifts=-steps, dims=1)
    shifted[:, -steps:] = fill
    return shifted
