"""The family registry: every module of this package (except `_`-prefixed helpers) is one family's record.

A record is a `records.MoEFamily` (converted both ways by `hf_moe.convert`) or a `records.DenseFamily` (a source
for `hf_moe.upcycle`) named `FAMILY`, whose `model_type` is the module's name. Adding a family is adding one
file here (plus its oracle test in tests/conversion/families/): the registry finds it by itself.

    from hf_moe.conversion.families import get_family
    moe_config = get_family("mixtral").config_to_moe(mixtral_config)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import DenseFamily, Family, MoEFamily
from ..tables import StateDictConverter

R = TypeVar("R", bound=Family)


def discover(path: Iterable[str], package: str) -> dict[str, Family]:
    """The records of the modules of `package` (at `path`), by model_type: each module not starting with "_"
    must define `FAMILY`, a record whose model_type is the module's name."""
    records: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        record = getattr(importlib.import_module(f"{package}.{info.name}"), "FAMILY", None)
        if not isinstance(record, Family) or record.model_type != info.name:
            raise TypeError(f"{package}.{info.name} must define FAMILY, a MoEFamily or DenseFamily with "
                            f"model_type={info.name!r} (got {record!r:.80}).")  # fmt: skip
        records[info.name] = record
    return records


RECORDS: dict[str, Family] = discover(__path__, __name__)
#: model types `hf_moe.convert` reads and writes
MOE_FAMILIES: tuple[str, ...] = tuple(name for name, r in RECORDS.items() if isinstance(r, MoEFamily))
#: model types `hf_moe.upcycle` reads
DENSE_FAMILIES: tuple[str, ...] = tuple(name for name, r in RECORDS.items() if isinstance(r, DenseFamily))


def _record(model_type: str, kind: type[R], what: str, elsewhere: str) -> R:
    record = RECORDS.get(model_type)
    if not isinstance(record, kind):
        known = tuple(name for name, r in RECORDS.items() if isinstance(r, kind))
        hint = f" {elsewhere}" if model_type in RECORDS else ""
        raise ValueError(f"model_type={model_type!r} is not a known {what} family: supported {what} families are "
                         f"{known}.{hint}")  # fmt: skip
    return record


def get_family(model_type: str) -> MoEFamily:
    """The record of the MoE family `model_type`; a ValueError listing the known ones otherwise."""
    return _record(model_type, MoEFamily, "MoE", "It is a dense family: make it MoE with hf_moe.upcycle.")


def get_dense_family(model_type: str) -> DenseFamily:
    """The record of the dense family `model_type`; a ValueError listing the known ones otherwise."""
    return _record(model_type, DenseFamily, "dense", "For MoE checkpoints use hf_moe.convert.")


# ------------------------------------------------------------------------------------- by model_type
def config_to_moe(hf_config: PreTrainedConfig) -> MoEConfig:
    """The MoEConfig of a transformers config of one of `MOE_FAMILIES` (by its `model_type`), computing what
    transformers' modeling code computes (the oracle); raises ValueError naming what hf_moe cannot express."""
    return get_family(hf_config.model_type).config_to_moe(hf_config)


def config_from_moe(moe_config: MoEConfig, family: str) -> PreTrainedConfig:
    """The transformers config of `family` for `moe_config`; raises ValueError naming the field the family
    cannot express. Training-only knobs (bias update rate, balance/z-losses, capacity, noise, MTP loss
    weight) are dropped, except router_aux_loss_coef (from aux_loss_alpha) and Mixtral's router_jitter_noise."""
    return get_family(family).config_from_moe(moe_config)


def state_dict_to_moe(
    family: str, tensors: Mapping[str, torch.Tensor], config: MoEConfig | PreTrainedConfig
) -> dict[str, torch.Tensor]:
    """A `family` state dict (transformers' in-memory names or the original per-expert checkpoint names)
    as an hf_moe state dict. `config` is the family's config or the converted MoEConfig."""
    record = get_family(family)
    if not isinstance(config, MoEConfig):
        config = record.config_to_moe(config)
    return StateDictConverter(record, config, "to_moe").convert(tensors)


def state_dict_from_moe(
    family: str, tensors: Mapping[str, torch.Tensor], moe_config: MoEConfig, layout: str = "transformers"
) -> dict[str, torch.Tensor]:
    """An hf_moe state dict as a `family` state dict. layout "transformers": exactly the keys of the
    family's transformers model (fused experts; a tied head is listed too, as in its `state_dict()`);
    "original": the released checkpoints' per-expert keys. Both load with the family's `from_pretrained`.
    DeepSeek-V3 MTP modules go to `model.layers.{N+k}.*` with copies of the embedding and head."""
    record = get_family(family)
    record.check_export(moe_config)
    return StateDictConverter(record, moe_config, "from_moe", layout).convert(tensors)


__all__ = [
    "DENSE_FAMILIES",
    "discover",
    "MOE_FAMILIES",
    "RECORDS",
    "config_from_moe",
    "config_to_moe",
    "get_dense_family",
    "get_family",
    "state_dict_from_moe",
    "state_dict_to_moe",
]
