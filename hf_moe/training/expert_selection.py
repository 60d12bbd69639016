"""Which experts a task uses: ESFT's expert relevance scores and top-p selection.

Expert-Specialised Fine-Tuning (Wang et al. 2024, arXiv 2407.01906 §3.2): run the model on task samples and,
per MoE layer, score every expert by
- "gate": its share of the gate weight the layer hands out (average gate score, ESFT-Gate), or
- "token": its share of the layer's top-k selections (token selection ratio, ESFT-Token);
then keep experts in descending score until their cumulative share reaches p (ESFT: 0.1 gate, 0.2 token).
Scores are summed over all (non-padding) task tokens, as the ESFT release does, and use the model's own
router decisions (`RouterOutput.topk_weights`, i.e. after renormalisation and scaling; the share makes the
scale irrelevant). The model runs in eval mode, so the routers' balancing counters are not touched.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..files import read_json, write_text_atomic
from ..modeling.routing import valid_tokens

logger = logging.getLogger(__name__)

CRITERIA = ("gate", "token")
DEFAULT_THRESHOLDS = {"gate": 0.1, "token": 0.2}


@torch.no_grad()
def expert_scores(
    model: nn.Module,
    dataset: Any,
    criterion: str = "gate",
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> dict[int, torch.Tensor]:
    """{layer index: (N,) float64 shares summing to 1} of the task's gate weight or top-k selections.

    `dataset`: a tensor of token ids (B, T); a dict of columns or an iterable of examples (dicts with
    `input_ids` and optionally `attention_mask`, lists of ids, or texts with a `tokenizer`); or an iterable
    of ready batches (dicts of 2-D tensors, e.g. a DataLoader). Padding (attention_mask 0) is not counted.
    `max_tokens` stops after about that many tokens (ESFT samples a fixed token budget).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is invalid: allowed values are {CRITERIA}.")
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = base.config.moe_layer_indices  # in the order the model returns their routings
    if not layers:
        raise ValueError("The model has no MoE layer to select experts from.")
    num_experts = base.config.n_routed_experts
    drops = base.config.capacity_factor is not None
    totals = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for input_ids, attention_mask in _batches(dataset, batch_size, tokenizer, max_length):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            routings = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).routings
            valid = valid_tokens(attention_mask, input_ids.shape[1]).reshape(-1)  # (B*T,) as the routers see them
            for row, routing in zip(totals, routings[: len(layers)]):
                ids, weights = routing.topk_ids[valid], routing.topk_weights[valid].double()  # (T', K)
                if criterion == "gate":
                    row.index_add_(0, ids.flatten().cpu(), weights.flatten().cpu())
                else:
                    kept = ids[weights != 0] if drops else ids.flatten()
                    row.index_add_(0, kept.cpu(), torch.ones(kept.numel(), dtype=torch.float64))
            seen += int(valid.sum())
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("The dataset gave no (non-padding) tokens to score experts on.")
    return {layer: row / row.sum() for layer, row in zip(layers, totals)}


def select_from_scores(scores: Mapping[int, torch.Tensor], threshold: float) -> dict[int, list[int]]:
    """Per layer, experts in descending share (ties: lower id first) until their cumulative share >= p."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} is invalid: it is a cumulative share p with 0 < p <= 1.")
    selection = {}
    for layer, shares in scores.items():
        order = sorted(range(len(shares)), key=lambda e: (-float(shares[e]), e))
        chosen, cumulative = [], 0.0
        for expert in order:
            if cumulative >= threshold:
                break
            chosen.append(expert)
            cumulative += float(shares[expert])
        selection[int(layer)] = sorted(chosen)
    return selection


def select_experts(
    model: nn.Module,
    dataset: Any,
    criterion: str = "gate",
    threshold: float | None = None,
    **options: Any,
) -> dict[int, list[int]]:
    """ESFT expert selection: {layer index: [expert ids to train]} for the task in `dataset`.

    `threshold` is ESFT's p (default 0.1 for "gate", 0.2 for "token"); `options` go to `expert_scores`
    (batch_size, max_tokens, tokenizer, max_length).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is invalid: allowed values are {CRITERIA}.")
    threshold = DEFAULT_THRESHOLDS[criterion] if threshold is None else threshold
    return select_from_scores(expert_scores(model, dataset, criterion, **options), threshold)


def _index(value: Any) -> int | None:
    """An int (numpy / 0-d tensor ints too) that is not a bool, else None: 1.7, True, "3" and None are refused."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def validate_selection(
    selection: Any, num_experts: int | None = None, layers: Iterable[int] | None = None, source: str | None = None
) -> dict[int, list[int]]:
    """{layer: distinct expert ids, in their order} of an expert selection, or a ValueError naming the layer and the bad
    value: layers are decoder-layer indices (ints, or their decimal strings as JSON keys), expert ids ints in
    [0, num_experts) (never coerced: 1.7 or true is not expert 1), `layers` the MoE layers allowed."""
    where = f"{source}: " if source else ""
    if not isinstance(selection, Mapping):
        raise ValueError(f"{where}an expert selection is a mapping {{layer: [expert ids]}}, got {type(selection).__name__}.")
    result: dict[int, list[int]] = {}
    for key, ids in selection.items():
        layer = int(key) if isinstance(key, str) and key.isdecimal() else _index(key)
        if layer is None or layer < 0:
            raise ValueError(f"{where}expert selection layer {key!r} is invalid: layers are decoder-layer indices "
                             "(ints >= 0).")
        if layer in result:
            raise ValueError(f"{where}expert selection names layer {layer} twice ({key!r}).")
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise ValueError(f"{where}experts[{layer}]={ids!r} is invalid: it must be a list of expert ids.")
        ids = list(ids)
        for expert in ids:
            index = _index(expert)
            if index is None:
                raise ValueError(f"{where}experts[{layer}]={ids!r} holds {expert!r} ({type(expert).__name__}): expert "
                                 "ids are ints.")
            if index < 0 or num_experts is not None and index >= num_experts:
                allowed = f"0 to {num_experts - 1}" if num_experts is not None else "0 up"
                raise ValueError(f"{where}experts[{layer}]={ids!r} is out of range: expert ids go from {allowed}.")
        result[layer] = list(dict.fromkeys(_index(e) for e in ids))
    if layers is not None:
        layers = list(layers)
        unknown = sorted(set(result) - set(layers))
        if unknown:
            raise ValueError(f"{where}experts names layers {unknown} that are not MoE layers; the MoE layers are "
                             f"{layers}.")
    return result


def empty_selection_notes(selection: Mapping[int, list[int]], trains_other_parts: bool) -> list[str]:
    """A selection without a single expert trains no routed expert. With nothing else trainable that is a run that
    trains nothing (ValueError); with shared experts or non-expert parts training it may be meant, so it is a
    logged warning, returned as a note for the recipe's report."""
    if any(selection.values()):
        return []
    if not trains_other_parts:
        raise ValueError("The expert selection holds no expert in any layer and train_shared_experts / "
                         "train_non_expert are off: the 'esft' recipe would train nothing. Select experts (e.g. "
                         "select_experts with a higher threshold) or use another recipe.")
    message = ("the expert selection holds no expert in any layer: no routed expert trains, only the shared "
               "experts / non-expert parts")
    logger.warning("ESFT: %s.", message)
    return [f"warning: {message}"]


def save_expert_selection(selection: Mapping[int, Iterable[int]], path: str | os.PathLike, **metadata: Any) -> None:
    """Write `{"experts": {"layer": [ids]}, ...metadata}` as JSON (e.g. criterion, threshold, model)."""
    data = dict(metadata)
    data["experts"] = {str(layer): experts for layer, experts in sorted(validate_selection(selection).items())}
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # a failed write keeps an earlier selection


def load_expert_selection(path: str | os.PathLike) -> dict[int, list[int]]:
    """Read a selection written by `save_expert_selection` (or ESFT's expert config: same "experts" key)."""
    data = read_json(path, expect=None)  # errors name the file; the shape is checked below
    experts = data.get("experts", data) if isinstance(data, dict) else None
    if not isinstance(experts, dict):
        raise ValueError(f"{path} holds no expert selection: expected {{'experts': {{layer: [ids]}}}}.")
    return validate_selection(experts, source=str(path))


# ---------------------------------------------------------------------------------------------- data
def _batches(
    dataset: Any, batch_size: int, tokenizer: Any, max_length: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches (B, T) from any of the inputs `expert_scores` accepts."""
    if isinstance(dataset, torch.Tensor):
        ids = dataset if dataset.dim() == 2 else dataset.unsqueeze(0)
        for start in range(0, ids.shape[0], batch_size):
            chunk = ids[start : start + batch_size, :max_length]
            yield chunk, torch.ones_like(chunk)
        return
    if isinstance(dataset, Mapping) and "input_ids" in dataset:
        input_ids = dataset["input_ids"]
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:  # one ready batch
            yield from _batches([dataset], batch_size, tokenizer, max_length)
            return
        masks = dataset.get("attention_mask")
        dataset = [
            {"input_ids": ids} if masks is None else {"input_ids": ids, "attention_mask": masks[i]}
            for i, ids in enumerate(input_ids)
        ]
    pending: list[tuple[list[int], list[int]]] = []
    for item in dataset:
        if isinstance(item, Mapping) and isinstance(item.get("input_ids"), torch.Tensor) and item["input_ids"].dim() == 2:
            ids = item["input_ids"][:, :max_length]
            mask = item.get("attention_mask")
            yield ids, (torch.ones_like(ids) if mask is None else mask[:, :max_length])
            continue
        pending.append(_example(item, tokenizer, max_length))
        if len(pending) == batch_size:
            yield _pad(pending)
            pending = []
    if pending:
        yield _pad(pending)


def _example(item: Any, tokenizer: Any, max_length: int | None) -> tuple[list[int], list[int]]:
    """One example as (token ids, attention mask) lists."""
    if isinstance(item, Mapping) and "input_ids" not in item and "text" in item:
        item = item["text"]
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("Texts need a tokenizer: pass tokenizer=... (or give token ids).")
        item = tokenizer(item)["input_ids"]
    if isinstance(item, Mapping):
        ids = item["input_ids"]
        mask = item.get("attention_mask")
    else:
        ids, mask = item, None
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    mask = [1] * len(ids) if mask is None else (mask.tolist() if isinstance(mask, torch.Tensor) else list(mask))
    return ids[:max_length], mask[:max_length]


def _pad(examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids (with 0) and masks (with 0) to the longest example."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, (tokens, keep) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(keep)] = torch.tensor(keep, dtype=torch.long)
    return ids, mask
