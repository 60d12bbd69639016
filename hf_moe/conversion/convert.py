"""`convert`: checkpoint folders of other MoE families <-> hf_moe, streaming, one tensor at a time.

    family folder  --config_to_moe + StateDictConverter("to_moe")-------------------> hf_moe folder
    hf_moe folder  --config_from_moe + StateDictConverter("from_moe", layout)-------> family folder
    family folder  --both, chained in one pass (through hf_moe, nothing stored)------> family folder

The direction comes from the source's config.json `model_type`. Before anything is written, the source's
safetensors headers are checked against its config (via the shapes of an hf_moe model built on the meta
device): unexpected and missing keys, incomplete per-expert groups and wrong shapes are all named in one
error. Then the tensors stream shard by shard through the converter(s) into a `ShardedWriter` inside a
temporary folder that is renamed to `out` only when complete (`rewrite_checkpoint`), so peak memory is one
output shard plus the per-expert groups still waiting for their last expert, never the model.

DeepSeek-V3's multi-token-prediction modules live on disk as `model.layers.{N+k}.*` (N = num_hidden_layers);
transformers drops them at load, hf_moe keeps them as `mtp.{k}.*`. A DeepSeek-V3 config that promises MTP
modules whose weights are absent (transformers' own `save_pretrained` writes none) converts without them.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..hub import add_remote_code
from ..modeling.configuration import MoEConfig
from ..modeling.model import MoEForCausalLM
from .checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    SIDE_FILES,
    CheckpointError,
    SourceCheckpoint,
    check_output_dir,
    parse_size,
    rewrite_checkpoint,
)
from .families import DENSE_FAMILIES, MOE_FAMILIES, get_family
from .tables import LAYOUTS, StateDictConverter, expected_shapes, source_problems
from .validation import require_floating_weights

logger = logging.getLogger(__name__)

HF_MOE = MoEConfig.model_type
MODEL_TYPES = (HF_MOE, *MOE_FAMILIES)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_SHOWN = 5  # keys named per kind of problem in an error


@dataclass
class ConversionReport:
    """What `convert` wrote: families in and out, tensor counts, bytes, shards and time."""

    source: str
    output: str
    family_in: str
    family_out: str
    layout: str | None  # the export layout ("original" | "transformers"); None when writing hf_moe
    tensors_in: int
    tensors_out: int
    bytes_written: int
    shards: int
    seconds: float
    side_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    remote_code: bool = False  # hf_moe's modeling files + auto_map written (loads with trust_remote_code=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        layout = f", {self.layout} layout" if self.layout else ""
        lines = [
            f"converted {self.source} ({self.family_in}) -> {self.output} ({self.family_out}{layout})",
            f"  {self.tensors_in} tensors in, {self.tensors_out} tensors out, {_human_bytes(self.bytes_written)} "
            f"in {self.shards} shard{'s' if self.shards != 1 else ''}, {self.seconds:.1f} s",
        ]
        if self.side_files:
            lines.append(f"  copied: {', '.join(self.side_files)}")
        if self.remote_code:
            lines.append("  remote code: modeling files + auto_map (loads with trust_remote_code=True without hf_moe)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    """The resolved conversion: families, the hf_moe config in the middle and the converter(s)."""

    family_in: str
    family_out: str
    moe_config: MoEConfig
    importer: StateDictConverter | None  # family keys -> hf_moe keys
    exporter: StateDictConverter | None  # hf_moe keys -> family keys
    notes: list[str]

    @property
    def first(self) -> StateDictConverter:
        """The converter that reads the source's keys."""
        converter = self.importer or self.exporter
        assert converter is not None, "hf_moe -> hf_moe is refused by _families"
        return converter


def _families(source: SourceCheckpoint, to: str | None) -> tuple[str, str]:
    model_type = source.config.get("model_type")
    if model_type not in MODEL_TYPES:
        hint = " Dense models become MoE with hf_moe.upcycle (hf-moe upcycle)." if model_type in DENSE_FAMILIES else ""
        raise CheckpointError(
            f"Cannot convert {str(source.folder)!r}: unknown architecture model_type={model_type!r} in its "
            f"config.json; supported model types are {MODEL_TYPES}.{hint}"
        )
    if to is not None and to not in MODEL_TYPES:
        raise ValueError(f"to={to!r} is not supported: allowed values are {MODEL_TYPES}.")
    if model_type == HF_MOE and to in (None, HF_MOE):
        raise ValueError(
            f"{str(source.folder)!r} is already an {HF_MOE} checkpoint: pass to=FAMILY (--to FAMILY) to export it, "
            f"one of {MOE_FAMILIES}."
        )
    return model_type, to or HF_MOE


def _plan(source: SourceCheckpoint, to: str | None, layout: str) -> _Plan:
    family_in, family_out = _families(source, to)
    notes: list[str] = []
    if family_in == HF_MOE:
        moe_config = MoEConfig.from_pretrained(source.folder)
    else:
        try:
            moe_config = get_family(family_in).config_to_moe(AutoConfig.from_pretrained(source.folder))
        except ValueError as error:
            message = f"Cannot convert {str(source.folder)!r} ({family_in} -> {HF_MOE}): {error}"
            raise CheckpointError(message) from error
        moe_config = _mtp_modules_on_disk(moe_config, source.keys(), notes)
    if family_out != HF_MOE:
        get_family(family_out).config_from_moe(moe_config)  # refuses, naming the field, what it cannot express
        if family_in != HF_MOE:
            notes.append(f"converted through {HF_MOE} in one pass (nothing stored in between)")
    importer = StateDictConverter(get_family(family_in), moe_config, "to_moe") if family_in != HF_MOE else None
    exporter = (StateDictConverter(get_family(family_out), moe_config, "from_moe", layout)
                if family_out != HF_MOE else None)  # fmt: skip
    return _Plan(family_in, family_out, moe_config, importer, exporter, notes)


def _mtp_modules_on_disk(config: MoEConfig, keys: Iterable[str], notes: list[str]) -> MoEConfig:
    """DeepSeek-V3 configs promise MTP modules (transformers' default is 1) that transformers' own save never
    writes: keep as many as the checkpoint holds (`model.layers.{N+k}.*`, k = 0, 1, ...)."""
    promised, n = config.num_nextn_predict_layers, config.num_hidden_layers
    if not promised:
        return config
    layers = {int(m.group(1)) for key in keys if (m := _LAYER_KEY.match(key))}
    held = 0
    while held < promised and n + held in layers:
        held += 1
    if held == promised:
        return config
    note = (
        f"config.json promises {promised} MTP module(s) but the checkpoint holds weights for {held} "
        f"(model.layers.{n}.* onwards): converting with num_nextn_predict_layers={held}"
    )
    logger.warning("%s", note)
    notes.append(note)
    return MoEConfig(**{**config.to_dict(), "num_nextn_predict_layers": held})


# --------------------------------------------------------------------------------------------- checking
def check_source(source: SourceCheckpoint, converter: StateDictConverter, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the source's keys and shapes (headers only) with what `expected` (hf_moe keys -> shapes) needs
    through `converter`; raise one CheckpointError naming every kind of problem found."""
    found = source_problems(converter, source.keys(), source.shape, expected, source.get)
    problems = [
        _listed("unexpected keys (not in the conversion table for this config)", sorted(set(found.unexpected))),
        _listed("missing keys", found.missing),
        _listed("incomplete per-expert groups", found.incomplete),
        _listed("shape mismatches", [f"{key} has shape {got}, expected {want}" for key, got, want in found.mismatched]),
        _listed(f"non-zero router balancing biases, which {converter.family} has no place for", found.nonzero),
    ]
    problems = [p for p in problems if p]
    if problems:
        hint = "\nThe checkpoint is quantized (fp8 scale tensors): dequantize it first." if found.quantized else ""
        raise CheckpointError(
            f"Cannot convert {str(source.folder)!r} ({converter.family}, {converter.direction}): its weights do not "
            f"match its config.json:\n" + "\n".join(problems) + hint
        )


def _listed(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"  {len(items)} {what}: " + "; ".join(items[:_SHOWN]) + more


# ------------------------------------------------------------------------------------------------ convert
def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    layout: str = "original",
    progress: bool = True,
    remote_code: bool = True,
) -> ConversionReport:
    """Convert the checkpoint folder `src` (config.json + safetensors, sharded or not) into `out`.

    A source of one of `MOE_FAMILIES` (deepseek_v3, deepseek_v2, mixtral, qwen2_moe, qwen3_moe, olmoe; fused or
    per-expert keys) becomes an hf_moe checkpoint (`to` None or "hf_moe"); an hf_moe source becomes the family
    `to`, refused with the field named where the family cannot express the config. A family source with a
    family `to` goes through hf_moe in one pass (e.g. to rewrite the same family in another layout).
    layout (exports): "original" writes the released checkpoints' per-expert keys (what transformers'
    `save_pretrained` writes), "transformers" its fused in-memory tensors; both load with `from_pretrained`.
    Writes config.json, the safetensors shards (+ index) of at most `max_shard_size` and copies
    generation_config.json and tokenizer files, into a temporary folder renamed to `out` when complete; an
    existing non-empty `out` is refused unless `overwrite`. Tensor dtypes are kept.
    remote_code (hf_moe outputs): also write hf_moe's modeling files and an `auto_map` into that folder
    (`hf_moe.hub.add_remote_code`, as `save_pretrained` does), so `out` loads with
    `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` where hf_moe is not installed; an export
    to another family never carries hf_moe's code (its own transformers classes load it).
    """
    start = time.perf_counter()
    parse_size(max_shard_size)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: allowed values are {LAYOUTS}.")
    check_output_dir(out, overwrite, src)
    with SourceCheckpoint(src) as source:
        plan = _plan(source, to, layout)
        check_source(source, plan.first, expected_shapes(plan.moe_config))
        require_floating_weights(source.keys(), source.dtype, str(src))
        tensors_in = len(source.keys())
    drop = {"lm_head.weight"} if plan.moe_config.tie_word_embeddings else set()  # on disk a tied head is left out
    with_code = remote_code and plan.family_out == HF_MOE

    def transform(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        pairs = plan.importer.push(key, tensor) if plan.importer else [(key, tensor)]
        if plan.exporter:
            pairs = [pair for k, t in pairs for pair in plan.exporter.push(k, t)]
        return [(k, t) for k, t in pairs if k not in drop]

    def finalize() -> list[tuple[str, torch.Tensor]]:
        for converter in (plan.importer, plan.exporter):
            if converter is not None:
                converter.finish()
        return []

    index = rewrite_checkpoint(
        src, out, transform, lambda folder: _write_config(plan, folder, with_code), finalize=finalize, overwrite=overwrite,
        max_shard_size=max_shard_size, progress=progress,
    )  # fmt: skip
    report = ConversionReport(
        source=str(src), output=str(out), family_in=plan.family_in, family_out=plan.family_out,
        layout=layout if plan.family_out != HF_MOE else None, tensors_in=tensors_in,
        tensors_out=len(index["weight_map"]), bytes_written=index["metadata"]["total_size"],
        shards=len(set(index["weight_map"].values())), seconds=time.perf_counter() - start,
        side_files=[name for name in SIDE_FILES if (Path(out) / name).is_file()], notes=plan.notes,
        remote_code=with_code,
    )  # fmt: skip
    logger.info("%s", report)
    return report


def _write_config(plan: _Plan, folder: Path, remote_code: bool) -> None:
    """config.json of the output (and, for an hf_moe output with `remote_code`, the modeling files + auto_map)."""
    config: PreTrainedConfig
    if plan.family_out == HF_MOE:
        config = copy.deepcopy(plan.moe_config)
        config.architectures = [MoEForCausalLM.__name__]
    else:
        config = get_family(plan.family_out).config_from_moe(plan.moe_config)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[plan.family_out]]
    config.save_pretrained(folder)
    if remote_code:
        add_remote_code(folder)


__all__ = ["HF_MOE", "MODEL_TYPES", "ConversionReport", "check_source", "convert"]
