"""Layer-by-layer forward passes on a small probe batch, with weights handed in one decoder layer at a time.

A streaming conversion never holds a whole model, yet it must show that the converted model computes what the
source computed. `LayerwiseRunner` builds a model on the meta device (no memory), then materialises one
decoder layer at a time from the tensors the converter has in hand (cast to fp32), runs it on the probe batch
and drops it again. One runner executes the dense source with transformers' own classes (its masks, RoPE and
layer code), another executes our MoE model; comparing their logits measures function preservation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..modeling.model import MoEForCausalLM
from ..modeling.rotary import RotaryEmbedding
from .validation import nan_max

_VOCAB_CHUNK = 8192  # rows of the output head cast to fp32 at a time


@dataclass
class ProbeBatch:
    """Token ids (B, T) and a right-padded attention mask (B, T) of 1 (token) / 0 (padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def from_ids(cls, sequences: list[list[int]] | torch.Tensor, pad_id: int = 0) -> ProbeBatch:
        if isinstance(sequences, torch.Tensor):
            ids = sequences.long().reshape(-1, sequences.shape[-1])
            return cls(ids, torch.ones_like(ids))
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("probe sequences must be non-empty lists of token ids.")
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return cls(ids, mask)

    @classmethod
    def random(cls, vocab_size: int, batch: int = 2, length: int = 24, seed: int = 0) -> ProbeBatch:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        return cls(ids, torch.ones_like(ids))

    @property
    def last_positions(self) -> torch.Tensor:
        """(B,) index of each sequence's last real token."""
        return self.attention_mask.sum(dim=1) - 1

    def valid(self) -> torch.Tensor:
        """(B, T) bool: real tokens."""
        return self.attention_mask.bool()


def _materialise(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Give a meta-device module the fp32 tensors (keys relative to it); zero-fill non-persistent buffers."""
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(sub, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return module


class LayerwiseRunner:
    """Run a causal LM on `batch` one decoder layer at a time (fp32). `kind` "dense": a transformers family
    model (its own layer, mask and RoPE code); "moe": our MoEForCausalLM."""

    def __init__(self, config: PreTrainedConfig, batch: ProbeBatch, kind: str) -> None:
        self.kind = kind
        self.batch = batch
        self.config = copy.deepcopy(config)
        with torch.device("meta"):
            if kind == "moe":
                self.model = MoEForCausalLM(self.config)
            else:
                self.model = AutoModelForCausalLM._model_mapping[type(self.config)](self.config)
        self.model.eval()
        self.config = self.model.config
        base = self.model.model
        self.rotary = RotaryEmbedding(self.config) if kind == "moe" else type(base.rotary_emb)(config=self.config)
        self.position_ids = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
        self.hidden: torch.Tensor | None = None
        self.masks: dict[str, torch.Tensor | None] = {}
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None

    def _layer_type(self, index: int) -> str:
        if self.kind == "moe":
            return "moe"
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return layer_types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    @torch.no_grad()
    def embed(self, embed_weight: torch.Tensor) -> None:
        """Start: hidden states = embedding rows of the probe tokens; masks and RoPE tables."""
        hidden = embed_weight[self.batch.input_ids].float()  # (B, T, H)
        mask = self.batch.attention_mask
        if self.kind == "moe":
            self.masks["moe"] = self.model.model.attention_mask_for(hidden, mask, None, self.position_ids)
        else:
            kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                          position_ids=self.position_ids)  # fmt: skip
            self.masks["full_attention"] = create_causal_mask(**kwargs)
            if getattr(self.config, "sliding_window", None):
                self.masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        self.position_embeddings = self.rotary(hidden, self.position_ids)
        self.hidden = hidden

    @torch.no_grad()
    def layer(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run decoder layer `index` with `tensors` (keys relative to the layer); returns its FFN input (B, T, H)."""
        layers = self.model.model.layers
        layer = _materialise(layers[index], tensors)
        captured: list[torch.Tensor] = []
        hook = layer.mlp.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            output = layer(
                self.hidden, attention_mask=self.masks[self._layer_type(index)], position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
            )  # fmt: skip
        finally:
            hook.remove()
            layers[index] = layer.to("meta")  # free the weights
        self.hidden = output[0] if isinstance(output, tuple) else output
        return captured[0]

    @torch.no_grad()
    def logits(self, norm_weight: torch.Tensor, head_weight: torch.Tensor) -> Iterator[torch.Tensor]:
        """Final norm, then logits (B, T, chunk) over the vocabulary in chunks (the head cast piece by piece)."""
        norm = _materialise(self.model.model.norm, {"weight": norm_weight})
        hidden = norm(self.hidden)
        for start in range(0, head_weight.shape[0], _VOCAB_CHUNK):
            yield F.linear(hidden, head_weight[start : start + _VOCAB_CHUNK].float())


def compare_logits(
    dense: LayerwiseRunner, moe: LayerwiseRunner, norm_weight: torch.Tensor, head_weight: torch.Tensor
) -> tuple[float, float]:
    """(max |logit_dense - logit_moe|, max |logit_dense|) over the real tokens of the probe batch; NaN when
    either forward gave a NaN (or both an infinity) anywhere."""
    valid = dense.batch.valid()
    max_diff, max_abs = 0.0, 0.0
    for a, b in zip(dense.logits(norm_weight, head_weight), moe.logits(norm_weight, head_weight)):
        max_diff = nan_max(max_diff, (a - b)[valid].abs().max().item())  # NaN stays NaN: never "exact"
        max_abs = nan_max(max_abs, a[valid].abs().max().item())
    return max_diff, max_abs


__all__ = ["LayerwiseRunner", "ProbeBatch", "compare_logits"]
