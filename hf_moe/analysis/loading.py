"""The models an analysis reads: any folder hf_moe loads, as an hf_moe `MoEForCausalLM` in eval mode.

- an hf_moe folder (`model_type: hf_moe`: trained, converted or upcycled with hf_moe; a Trainer checkpoint
  folder of one), loaded with `from_pretrained`;
- a folder of one of the MoE families hf_moe converts (DeepSeek-V3/V2, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE:
  `hf_moe.conversion.families.MOE_FAMILIES`), converted in memory (config mapping and key table of
  `hf_moe.convert`, nothing written; it needs the memory of the whole model, in fp32);
- anything else is refused in one line: dense families (no experts: upcycle them first), other model types.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..modeling.configuration import MoEConfig
from ..modeling.model import MoEForCausalLM
from ..training.balancing import find_routers

HF_MOE = MoEConfig.model_type
# the fields that fix what a trace means: checkpoints compared with a model must agree on all of them
ROUTING_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
                  "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group")


class ModelLoadError(ValueError):
    """A model folder the analysis cannot use (missing, not a model, not MoE, unreadable, mismatched)."""


@dataclass
class LoadedModel:
    """A model ready to trace: the hf_moe model (eval mode), where it came from and how."""

    model: MoEForCausalLM
    path: Path
    source: str  # "hf_moe" or the family converted in memory

    @property
    def config(self) -> MoEConfig:
        return self.model.config


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist.")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a model folder (give the folder with config.json).")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file} cannot be read as JSON: {error}.") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} does not hold a JSON object.")
    return config


def _convert_in_memory(path: Path, family: str) -> MoEForCausalLM:
    from transformers import AutoConfig

    from ..conversion.checkpoint_io import SourceCheckpoint
    from ..conversion.families import config_to_moe, state_dict_to_moe

    config = config_to_moe(AutoConfig.from_pretrained(path))
    with SourceCheckpoint(path) as source:
        tensors = state_dict_to_moe(family, {key: source.get(key) for key in source.keys()}, config)
    mtp_depths = {int(key.split(".")[1]) for key in tensors if key.startswith("mtp.")}
    config = MoEConfig(**{**config.to_dict(), "num_nextn_predict_layers": len(mtp_depths)})  # MTP weights held
    model = MoEForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if config.tie_word_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    missing = [key for key in missing if not key.endswith("e_score_correction_bias")]  # families without a bias
    if missing or unexpected:
        raise ModelLoadError(f"{str(path)!r} ({family}) did not convert to a complete hf_moe model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _model_type(path: Path) -> str:
    """The folder's model_type if hf_moe loads it, else a ModelLoadError saying why not."""
    from ..conversion.families import DENSE_FAMILIES
    from ..conversion.families import MOE_FAMILIES as FAMILIES

    model_type = _read_config(path).get("model_type")
    if model_type in DENSE_FAMILIES:
        raise ModelLoadError(f"{str(path)!r} is a dense {model_type} model, not an MoE model: it has no experts to "
                             "analyse (make an MoE of it with `hf-moe upcycle`).")
    if model_type != HF_MOE and model_type not in FAMILIES:
        raise ModelLoadError(f"{str(path)!r} has model_type={model_type!r}, not an MoE model hf_moe loads: "
                             f"allowed model types are {(HF_MOE, *FAMILIES)}.")
    return model_type


def _loading(path: Path, what: Any) -> Any:
    """Run `what()`, turning load failures into one-line ModelLoadErrors naming the folder."""
    try:
        return what()
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load {str(path)!r} as an MoE model: {message}") from error


def load_moe_config(path: str | os.PathLike) -> MoEConfig:
    """The MoEConfig of the model in folder `path` (a family's config mapped to hf_moe), without weights."""
    path = Path(path)
    model_type = _model_type(path)
    if model_type == HF_MOE:
        return _loading(path, lambda: MoEConfig.from_pretrained(path))
    from transformers import AutoConfig

    from ..conversion.families import config_to_moe

    return _loading(path, lambda: config_to_moe(AutoConfig.from_pretrained(path)))


def load_moe_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """The MoE model in folder `path` as an hf_moe model in eval mode on `device` (module docstring)."""
    path = Path(path)
    model_type = _model_type(path)
    if model_type == HF_MOE:
        model = _loading(path, lambda: MoEForCausalLM.from_pretrained(path))
    else:
        model = _loading(path, lambda: _convert_in_memory(path, model_type))
    if not find_routers(model):
        raise ModelLoadError(f"{str(path)!r} has no MoE layer (every layer is dense): nothing to analyse.")
    return LoadedModel(model.to(device).eval(), path, model_type)


def check_same_architecture(reference: MoEConfig, other: MoEConfig, name: str) -> None:
    """Raise ModelLoadError naming the first of `ROUTING_FIELDS` where checkpoint `name` differs."""
    for key in ROUTING_FIELDS:
        mine, theirs = getattr(other, key), getattr(reference, key)
        if mine != theirs:
            raise ModelLoadError(f"checkpoint {name!r} has {key}={mine!r} but the model has {key}={theirs!r}: "
                                 "checkpoints must be of the same architecture (the same run) as the model.")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step of a checkpoint folder: from a `checkpoint-{step}` name, else `trainer_state.json`'s
    `global_step`, else None."""
    path = Path(path)
    if match := re.search(r"checkpoint-(\d+)$", path.name):
        return int(match.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError):
            return None
        return int(step) if isinstance(step, int) else None
    return None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """AutoTokenizer of folder `path`, or a ModelLoadError saying to pass one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"no tokenizer could be loaded from {str(path)!r} ({type(error).__name__}): pass the "
                             "folder of the model's tokenizer (--tokenizer DIR).") from error
