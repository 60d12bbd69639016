"""Which part of an MoE model each module and parameter belongs to: the one classification that the
finetuning recipes (what to freeze), their reports and the parameter counts of `hf_moe.inspection` share.

A module's part comes from its class (router, routed experts, attention, norm, embedding, MTP module) or, for
the SwiGLU MLP, from its place (`shared_experts` or a dense FFN); a module of no such type inherits its
parent's part, so e.g. the MTP block's attention is "attention" and its input projection `eh_proj` is "mtp".
"""

from __future__ import annotations

import re

from torch import nn

from ..modeling.attention import GroupedQueryAttention, MultiHeadLatentAttention
from ..modeling.experts import MLP, RoutedExperts
from ..modeling.moa import MixtureOfAttentionHeads
from ..modeling.moe import MoEBlock
from ..modeling.mtp import MTPModule
from ..modeling.normalization import RMSNorm
from ..modeling.routing import Router

#: The parts of a model, in report order. "lm_head" is the output head (`lm_head`, or a classifier's `score`);
#: "lora" holds adapter weights (peft's lora_A / lora_B ...); "other" whatever is none of the rest.
PARTS = (
    "embeddings", "attention", "dense_ffn", "router", "routed_experts", "shared_experts", "norms", "lm_head",
    "mtp", "lora", "other",
)
HEAD_NAMES = ("lm_head", "score")
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_MTP_NAME = re.compile(r"(?:^|\.)mtp\.(\d+)(?:\.|$)")
#: hf_moe's module classes by name, so that a model loaded as remote code (the same classes, copied into
#: `transformers_modules`) is classified too.
_CLASS_PARTS = {cls.__name__: part for cls, part in (
    (RoutedExperts, "routed_experts"), (Router, "router"), (MoEBlock, "shared_experts"),  # the block's own: the gate
    (MultiHeadLatentAttention, "attention"), (GroupedQueryAttention, "attention"), (RMSNorm, "norms"),
    (MixtureOfAttentionHeads, "attention"),
    (MTPModule, "mtp"),
)}


def _own_part(name: str, module: nn.Module) -> str | None:
    """The part a module's parameters belong to, or None to inherit its parent's."""
    kind = type(module).__name__
    if kind == MLP.__name__:
        return "shared_experts" if name.endswith("shared_experts") else "dense_ffn"
    if kind in _CLASS_PARTS:
        return _CLASS_PARTS[kind]
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, nn.LayerNorm):  # norm_type="layer_norm"
        return "norms"
    if name.rsplit(".", 1)[-1] in HEAD_NAMES:
        return "lm_head"
    return None


def module_parts(model: nn.Module) -> dict[str, str]:
    """{module name: part} (a module inherits its parent's part unless its type names one)."""
    parts: dict[str, str] = {}
    for name, module in model.named_modules():
        parent = parts.get(name.rsplit(".", 1)[0] if "." in name else "", "other")
        parts[name] = _own_part(name, module) or parent
    return parts


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """{parameter name: part} for every parameter of `model` (tied weights listed once)."""
    modules = module_parts(model)
    parts = {}
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        parts[name] = "lora" if ".lora_" in f".{name}" else modules.get(owner, "other")
    return parts


def layer_index(name: str) -> int:
    """The decoder layer a module or parameter name lies in ("model.layers.3.mlp.experts" -> 3, through
    wrappers' prefixes too); -1 outside the decoder layers (embeddings, head, MTP blocks)."""
    match = None if _MTP_NAME.search(name) else _LAYER_NAME.search(name)
    return int(match.group(1)) if match else -1


def layer_label(name: str) -> str:
    """A short label for a module's place: "layer_3" for decoder layer 3, "mtp_0" for the MTP block of depth 1
    ("mtp.0...."); anything else: the name itself."""
    if match := _MTP_NAME.search(name):
        return f"mtp_{match.group(1)}"
    index = layer_index(name)
    return f"layer_{index}" if index >= 0 else name


__all__ = ["PARTS", "layer_index", "layer_label", "module_parts", "parameter_parts"]
