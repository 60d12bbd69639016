"""Which base model a finetuned delta belongs to, and a delta checked whole before any of it is written.

A delta holds only what training changed, so applying it to another model with the same shapes "works" and
silently gives a model that never existed. `base_fingerprint` records, at save time, the architecture fields
of the config and a few values of tensors the recipe kept frozen (so still the base's): up to `MAX_TENSORS`
tensors spread over the model, `SAMPLES` evenly spaced values each. `check_base` compares them with the model
the delta is applied to; values are compared in the coarser of the two dtypes (a base saved in fp32 and loaded
in bf16 still matches; any other difference does not).

`prepare_delta` runs every check of `apply_finetuned_delta` (names, shapes, expert rows, dtypes, the base) and
converts every value to its target's device and dtype before the caller writes anything, so a bad delta leaves
the model untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..modeling.experts import RoutedExperts
from .frozen_experts import FUSED_EXPERT_WEIGHTS, _is_dtensor, trainable_experts

MAX_TENSORS = 8
SAMPLES = 16
ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "attention_type", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "hidden_act", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size", "n_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "scoring_func", "topk_method", "n_group", "topk_group", "num_nextn_predict_layers",
    "tie_word_embeddings",
    # the knobs of the families wave (issue 15) and the router types (issue 16): a base differing in any of them
    # is another model even with equal shapes (compared only where the delta's fingerprint records them)
    "router_type", "glu_type", "glu_limit", "norm_type", "norm_bias", "mlp_bias", "expert_bias", "router_bias",
    "lm_head_bias", "moe_output_bias", "attention_bias", "attention_sinks", "qk_norm", "layer_types", "nope_layers",
    "sliding_window", "attention_chunk_size", "sublayer_norm", "moa_experts", "moa_top_k", "last_k_dense_replace",
    "gate_on_expert_input",
)  # fmt: skip


def _frozen_parts(model: nn.Module) -> dict[str, list[int] | None]:
    """{parameter name: None (all of it) or the frozen expert rows} of what training left at the base's values."""
    experts = {f"{name}.{w}": m for name, m in model.named_modules() if isinstance(m, RoutedExperts)
               for w in FUSED_EXPERT_WEIGHTS}  # fmt: skip
    frozen: dict[str, list[int] | None] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen[name] = None
        elif name in experts:
            trained = set(trainable_experts(experts[name]))
            rows = [e for e in range(experts[name].num_experts) if e not in trained]
            if rows:
                frozen[name] = rows
    return frozen


def _sample(tensor: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """`SAMPLES` evenly spaced values of `tensor` (of its `rows` only), in its dtype, on the CPU."""
    value = tensor.full_tensor() if _is_dtensor(tensor) else tensor
    value = value.detach()
    if rows is not None:
        value = value.index_select(0, torch.tensor(rows, device=value.device))
    flat = value.reshape(-1)
    count = min(SAMPLES, flat.numel())  # evenly spaced, in integers (float32 steps overrun past 2^24 values)
    index = torch.arange(count, dtype=torch.int64) * max(flat.numel() - 1, 0) // max(count - 1, 1)
    return flat[index.to(flat.device)].cpu()


def _config_fields(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {name: getattr(config, name, None) for name in ARCHITECTURE_FIELDS}


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the finetuned model's base: architecture fields and samples of still-frozen tensors."""
    frozen = _frozen_parts(model)
    names = sorted(frozen)
    if len(names) > MAX_TENSORS:
        names = sorted({names[round(i * (len(names) - 1) / (MAX_TENSORS - 1))] for i in range(MAX_TENSORS)})
    params = dict(model.named_parameters())
    tensors = {}
    for name in names:
        sample = _sample(params[name], frozen[name])
        tensors[name] = {"rows": frozen[name], "dtype": str(sample.dtype).removeprefix("torch."),
                         "values": sample.double().tolist()}
    return {"config": _config_fields(model), "tensors": tensors}


def _same_values(recorded: list[float], recorded_dtype: torch.dtype, current: torch.Tensor) -> int:
    """How many sampled values differ, compared in the coarser of the two dtypes (NaN equals NaN)."""
    coarser = recorded_dtype if torch.finfo(recorded_dtype).eps >= torch.finfo(current.dtype).eps else current.dtype
    a = torch.tensor(recorded, dtype=torch.float64).to(coarser).double()
    b = current.to(coarser).double()
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((~((a == b) | (a.isnan() & b.isnan()))).sum())


def base_differences(model: nn.Module, fingerprint: Mapping[str, Any]) -> list[str]:
    """What differs between `model` and the base recorded in `fingerprint` (empty when it is that base)."""
    differences = []
    here = _config_fields(model)
    for name, value in fingerprint.get("config", {}).items():
        if name in here and here[name] != value:
            differences.append(f"config.{name} is {here[name]!r} here, {value!r} in the delta's base")
    params = dict(model.named_parameters())
    for name, entry in fingerprint.get("tensors", {}).items():
        if name not in params:
            differences.append(f"this model has no tensor {name}")
            continue
        sample = _sample(params[name], entry.get("rows"))
        if not sample.is_floating_point():
            differences.append(f"{name} is {sample.dtype} here")
            continue
        wrong = _same_values(entry["values"], getattr(torch, entry["dtype"]), sample)
        if wrong:
            differences.append(f"{name} differs from the delta's base ({wrong} of {len(entry['values'])} sampled "
                               "values)")
    return differences


def prepare_delta(
    model: nn.Module, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike,
    check_base: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """[(target, expert rows or None, value ready to copy)] for every tensor of the delta, after every check; raise
    a ValueError naming the problem (nothing of `model` is changed here)."""
    where = f"The delta in {os.fspath(directory)}"
    entries = manifest.get("tensors")
    if not isinstance(entries, Mapping):
        raise ValueError(f"{where} has a manifest without a 'tensors' table.")
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(entries) - set(state))
    if missing:
        raise ValueError(f"{where}: the model has no tensors named {missing[:5]}: is it the delta's base model "
                         f"({manifest.get('base_model')})?")
    absent, extra = sorted(set(entries) - set(tensors)), sorted(set(tensors) - set(entries))
    if absent or extra:
        raise ValueError(f"{where} is inconsistent: its manifest lists {absent[:5]} that the weights file lacks, "
                         f"the weights file holds {extra[:5]} that the manifest does not list.")
    writes = []
    for name, entry in entries.items():
        target, value = state[name], tensors[name]
        rows = entry.get("experts") if isinstance(entry, Mapping) else None
        if rows is not None:
            if (not isinstance(rows, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in rows)
                    or len(set(rows)) != len(rows) or any(not 0 <= r < target.shape[0] for r in rows)):
                raise ValueError(f"{where}: tensor {name} lists expert rows {rows!r}; they must be distinct ints in "
                                 f"[0, {target.shape[0]}).")
        expected = tuple(target.shape) if rows is None else (len(rows), *target.shape[1:])
        if tuple(value.shape) != expected:
            raise ValueError(f"Delta tensor {name} has shape {tuple(value.shape)}, the model needs {expected}.")
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(f"Delta tensor {name} is {value.dtype}, the model's is {target.dtype}.")
        index = None if rows is None else torch.tensor(rows, device=target.device)
        writes.append((target, index, value.to(device=target.device, dtype=target.dtype)))
    fingerprint = manifest.get("base")
    if check_base and fingerprint is not None:
        differences = base_differences(model, fingerprint)
        if differences:
            named = f" ({manifest['base_model']})" if manifest.get("base_model") else ""
            more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
            raise ValueError(f"{where} was finetuned from another base model{named}: {'; '.join(differences[:5])}"
                             f"{more}. Apply it to the model it was finetuned from (check_base=False skips this "
                             "check).")
    return writes


__all__ = ["base_differences", "base_fingerprint", "prepare_delta"]
