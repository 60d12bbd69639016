"""Finetuned deltas: save only what a recipe let training change (trainable tensors, the trained rows of
partially frozen expert tensors, the router biases) and write it back into the base model later."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from ..files import atomic_files, read_json
from .delta_checks import base_fingerprint, prepare_delta
from .frozen_experts import FUSED_EXPERT_WEIGHTS, _is_dtensor, experts_modules, trainable_experts

DELTA_WEIGHTS, DELTA_MANIFEST = "delta.safetensors", "delta.json"
logger = logging.getLogger(__name__)


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
        "format": "hf_moe.finetuned_delta", "version": 2, "recipe": getattr(model, "hf_moe_recipe", None),
        "base_model": getattr(config, "_name_or_path", None) or None, "base": base_fingerprint(model),
        "tensors": entries, **metadata,
    }
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        # both files written aside, then renamed together: a failure leaves an earlier delta whole
        with atomic_files(os.path.join(directory, DELTA_WEIGHTS), os.path.join(directory, DELTA_MANIFEST)) as tmps:
            save_file(tensors, tmps[0], metadata={"format": "pt"})
            tmps[1].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


@torch.no_grad()
def apply_finetuned_delta(model: nn.Module, directory: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Write a delta saved by `save_finetuned_delta` into its base model (in place); returns the model.

    Everything is checked before anything is written (names, shapes, expert rows, and that `model` is the base
    the delta was finetuned from: architecture fields and sampled frozen values, see `delta_checks`), so a
    refused delta leaves the model as it was. `check_base=False` skips the base check only."""
    from safetensors.torch import load_file

    manifest = read_json(os.path.join(directory, DELTA_MANIFEST))  # errors name the file
    if manifest.get("format") != "hf_moe.finetuned_delta":
        raise ValueError(f"{directory} holds no hf_moe finetuned delta (format={manifest.get('format')!r}).")
    if check_base and "base" not in manifest:
        logger.warning("The delta in %s records no base fingerprint (saved by an older hf_moe): it cannot be checked "
                       "against its base model.", directory)
    tensors = load_file(os.path.join(directory, DELTA_WEIGHTS))
    for target, index, value in prepare_delta(model, manifest, tensors, directory, check_base=check_base):
        if index is None:
            target.copy_(value)
        else:
            target.index_copy_(0, index, value)
    return model
