"""Finetuned deltas: save only what a recipe let training change (trainable tensors, the trained rows of
partially frozen expert tensors, the router biases) and write it back into the base model later."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .frozen_experts import FUSED_EXPERT_WEIGHTS, _is_dtensor, experts_modules, trainable_experts

DELTA_WEIGHTS, DELTA_MANIFEST = "delta.safetensors", "delta.json"


def save_finetuned_delta(model: nn.Module, directory: str | os.PathLike, **metadata: Any) -> dict:
    """Save only what training could change: trainable tensors, the trained rows of partially frozen expert
    tensors, and the router biases, plus a manifest (`delta.json`). Returns the manifest.

    Re-apply with `apply_finetuned_delta(base_model, directory)`. Call it on every rank under FSDP2
    (DTensors are gathered); only rank 0 writes.
    """
    from safetensors.torch import save_file

    experts_of = {f"{name}.{w}": m for name, m in experts_modules(model).items() for w in FUSED_EXPERT_WEIGHTS}
    tensors, entries = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        value = param.full_tensor() if _is_dtensor(param) else param
        module = experts_of.get(name)
        trained = trainable_experts(module) if module is not None else None
        if trained is not None and len(trained) < module.num_experts:
            tensors[name] = value.detach().index_select(0, torch.tensor(trained, device=value.device)).cpu()
            entries[name] = {"experts": trained}
        else:
            tensors[name] = value.detach().cpu().contiguous()
            entries[name] = {}
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = (buffer.full_tensor() if _is_dtensor(buffer) else buffer).detach().cpu().contiguous()
            entries[name] = {}
    config = getattr(model, "config", None)
    manifest = {
        "format": "hf_moe.finetuned_delta", "version": 1, "recipe": getattr(model, "hf_moe_recipe", None),
        "base_model": getattr(config, "_name_or_path", None) or None, "tensors": entries, **metadata,
    }
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, DELTA_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(directory, DELTA_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


@torch.no_grad()
def apply_finetuned_delta(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Write a delta saved by `save_finetuned_delta` into its base model (in place); returns the model."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, DELTA_MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != "hf_moe.finetuned_delta":
        raise ValueError(f"{directory} holds no hf_moe finetuned delta (format={manifest.get('format')!r}).")
    tensors = load_file(os.path.join(directory, DELTA_WEIGHTS))
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(manifest["tensors"]) - set(state))
    if missing:
        raise ValueError(f"The model has no tensors named {missing[:5]}: is it the delta's base model "
                         f"({manifest.get('base_model')})?")
    for name, entry in manifest["tensors"].items():
        target, value = state[name], tensors[name]
        rows = entry.get("experts")
        index = torch.tensor(rows, device=target.device) if rows is not None else None
        expected = target.shape if index is None else (len(rows), *target.shape[1:])
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"Delta tensor {name} has shape {tuple(value.shape)}, the model needs {tuple(expected)}.")
        value = value.to(device=target.device, dtype=target.dtype)
        if index is None:
            target.copy_(value)
        else:
            target.index_copy_(0, index, value)
    return model
