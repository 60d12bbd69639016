"""Publishing to the Hugging Face Hub: model card, remote-code export, Hub-ready folders and upload.

`save_for_hub(model_or_dir, out)` writes what a Hub repository needs: safetensors shards (+ index), `config.json`,
`generation_config.json`, a model card (`README.md`) and, with `remote_code=True`, the self-contained
`hf_moe/modeling/` files plus an `auto_map` in `config.json`, so that
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works where hf_moe is not installed.
`MoEPreTrainedModel.save_pretrained` adds the same modeling files and `auto_map` to every folder it writes (the
"remote_code" hook; `remote_code=False` leaves them out), and so do `hf_moe.convert` (to hf_moe) and
`hf_moe.upcycle` (`add_remote_code`, inside their atomic output folders; `remote_code=False` there too). Where
hf_moe is imported, transformers prefers its registered classes to a folder's remote code even with
`trust_remote_code=True` (`explicit_local_code` in transformers' Auto classes), so hf_moe's classes, kernels and
training tools are used there.
`push_to_hub(model_or_dir, repo_id)` writes that folder to a temporary directory and uploads it in one commit.

Loading stays safe either way: `MoEPreTrainedModel.from_pretrained` reads safetensors only and, for a checkpoint
saved by the same class, fails on missing or unexpected weights (see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from . import __version__
from .conversion.checkpoint_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SIDE_FILES,
    SourceCheckpoint,
    parse_size,
)
from .files import atomic_file, atomic_output_dir, copy_inside, read_json, write_text_atomic
from .inspection import attention_summary, count_parameters, human_count, routing_summary
from .modeling import model as modeling_model
from .modeling.configuration import MoEConfig
from .modeling.kernel_hooks import register_kernel
from .modeling.model import MoEPreTrainedModel

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from transformers import PreTrainedTokenizerBase

#: `config.json` auto_map written by `export_remote_code`: Auto class -> "file.Class" of the copied files.
AUTO_MAP = {
    "AutoConfig": "configuration.MoEConfig",
    "AutoModel": "model.MoEModel",
    "AutoModelForCausalLM": "model.MoEForCausalLM",
    "AutoModelForSequenceClassification": "model.MoEForSequenceClassification",
}
#: Top-level packages the remote-code files may import besides the standard library and their siblings.
#: transformers checks every import statement of the copied files (`check_imports`); these are transformers
#: itself and its own hard dependencies, so any environment that can load the repository has them.
REMOTE_CODE_PACKAGES = frozenset({"torch", "transformers", "huggingface_hub"})
#: Tags every card carries (the Hub adds `custom_code` itself when it sees an auto_map; we state it too).
BASE_TAGS = ("hf_moe", "moe", "mixture-of-experts")

_MODELING_DIR = Path(modeling_model.__file__).parent
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- remote code
def remote_code_files() -> list[Path]:
    """The modeling files a repository needs: the files named in `AUTO_MAP` and, recursively, every sibling
    they import (found the way transformers' loader finds them). Raises if one imports a foreign package."""
    roots = sorted({_MODELING_DIR / f"{ref.split('.')[0]}.py" for ref in AUTO_MAP.values()})
    files = set(roots)
    for root in roots:
        files.update(Path(f) for f in get_relative_import_files(root))
    files = sorted(files)
    check_remote_code_imports(files)
    return files


def check_remote_code_imports(files: Sequence[Path]) -> None:
    """Raise ImportError naming each file that imports something other than the standard library,
    `REMOTE_CODE_PACKAGES` or a sibling: transformers would refuse to load such a repository elsewhere."""
    allowed = set(sys.stdlib_module_names) | REMOTE_CODE_PACKAGES
    problems = [f"{Path(f).name} imports {sorted(set(get_imports(f)) - allowed)}"
                for f in files if set(get_imports(f)) - allowed]
    if problems:
        raise ImportError("hf_moe/modeling must import only the standard library, "
                          f"{sorted(REMOTE_CODE_PACKAGES)} and sibling modules, but " + "; ".join(problems))


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved hf_moe model folder.")
    config = read_json(path)
    if config.get("model_type") != MoEConfig.model_type:
        raise ValueError(f"{path} has model_type={config.get('model_type')!r}, expected {MoEConfig.model_type!r}.")
    return config


def _write_config(folder: Path, config: Mapping[str, Any]) -> None:
    """Write config.json the way transformers does (sorted keys, 2-space indent, trailing newline), atomically."""
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_remote_code(folder: str | os.PathLike) -> None:
    """Copy the modeling files (`remote_code_files()`) flat into the saved hf_moe folder `folder` (each file
    atomically) and add `AUTO_MAP` to its config.json; a folder of another model_type is refused (ValueError).
    What `save_pretrained` (the "remote_code" hook), `hf_moe.convert` to hf_moe and `hf_moe.upcycle` all call."""
    folder = Path(folder)
    config = _read_config(folder)
    for file in remote_code_files():
        with atomic_file(folder / file.name) as tmp:
            shutil.copyfile(file, tmp)
    config["auto_map"] = dict(AUTO_MAP)
    _write_config(folder, config)


def export_remote_code(
    model_or_dir: MoEPreTrainedModel | str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Make `out` loadable with `trust_remote_code=True` where hf_moe is not installed.

    A model is saved to `out` (`save_pretrained`); a saved folder has its publishable files (`publishable_files`:
    weights, config, generation defaults, tokenizer) copied to `out`, or is completed in place when `out` is that
    folder. The modeling files (`remote_code_files()`) are copied flat into `out` and `config.json` gets
    `auto_map` (`AUTO_MAP`). A new `out` is written next to it and swapped in when complete; a non-empty `out`
    raises FileExistsError unless `overwrite`. Returns `out`.
    """
    out = Path(out)
    source = None if isinstance(model_or_dir, MoEPreTrainedModel) else Path(model_or_dir)
    if source is not None and _same_folder(source, out):
        add_remote_code(out)
        return out
    with atomic_output_dir(out, overwrite, src=source) as tmp:
        if source is None:
            model_or_dir.save_pretrained(tmp)
        else:
            _copy_saved_folder(source, tmp)
        add_remote_code(tmp)
    return out


# ------------------------------------------------------------------------------------------- model card
def _hub_model_id(name: object) -> str | None:
    """`name` when it is a valid Hub model id and not a local path (the Hub rejects other `base_model`s)."""
    if not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _upcycling_source(recipe: Mapping[str, Any]) -> object:
    """The dense model an `upcycled_from` recipe names, whichever key the recipe uses for it."""
    for key in ("base_model", "source", "model", "name_or_path", "path"):
        if recipe.get(key):
            return recipe[key]
    return None


def _balancing_row(config: MoEConfig) -> str:
    terms = []
    if config.router_bias_update_rate > 0:
        terms.append(f"auxiliary-loss-free bias (gamma {config.router_bias_update_rate:g})")
    for field, name in (("aux_loss_alpha", "expert balance loss"), ("device_aux_loss_alpha", "device balance loss"),
                        ("seq_aux_loss_alpha", "sequence-wise balance loss"), ("router_z_loss_coef", "router z-loss")):
        if getattr(config, field) > 0:
            terms.append(f"{name} ({getattr(config, field):g})")
    return ", ".join(terms) or "none"


def _format_value(value: object) -> str:
    """A balance statistic for the card: numbers compactly, per-layer sequences as min / mean / max."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        numbers = [float(v) for v in value]
        return (f"{min(numbers):.4g} / {sum(numbers) / len(numbers):.4g} / {max(numbers):.4g} "
                f"(min / mean / max over {len(numbers)})")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[tuple[str, object]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows]


def model_card(
    model_or_config: MoEPreTrainedModel | MoEConfig,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    balance: Mapping[str, object] | None = None,
    tags: Sequence[str] = (),
    remote_code: bool = True,
) -> str:
    """The README.md of an hf_moe repository: YAML metadata and a description of the architecture.

    Metadata: `library_name: transformers`, `pipeline_tag: text-generation`, tags (`BASE_TAGS`, `custom_code`
    with remote code, `upcycled` when upcycled, then `tags`), `license` as given, `base_model` (the argument, else
    the Hub id in the config's `upcycled_from` recipe; local paths are left out) and the recipe itself under
    `upcycling`. Body: total/active parameters (`hf_moe.inspection.count_parameters`), layers, attention,
    experts, routing, balancing, MTP, the upcycling recipe, and `balance` (statistic name -> number, text or
    per-layer sequence, e.g. `{"MaxVio (per layer)": [...], "measured on": "wikitext, 1M tokens"}`) if known.
    """
    config = model_or_config if isinstance(model_or_config, MoEConfig) else model_or_config.config
    recipe = getattr(config, "upcycled_from", None) or None
    if recipe is not None and not isinstance(recipe, Mapping):
        raise ValueError(f"config.upcycled_from={recipe!r:.60} is invalid for the model card: expected a dict "
                         "(the upcycling recipe, e.g. {'base_model': 'org/dense', ...}) or None.")
    count = count_parameters(model_or_config)
    source = _upcycling_source(recipe) if recipe else None
    base_model = base_model or _hub_model_id(source)

    all_tags = [*BASE_TAGS, *(["custom_code"] if remote_code else []), *(["upcycled"] if recipe else []), *tags]
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(all_tags)),
    }
    if license:
        metadata["license"] = license
    if base_model:
        metadata["base_model"] = base_model
    if recipe:
        metadata["upcycling"] = json.loads(json.dumps(dict(recipe), default=str))
    front_matter = ModelCardData(**metadata).to_yaml()

    n_moe = len(config.moe_layer_indices)
    rows: list[tuple[str, object]] = [
        ("Parameters (total)", f"{human_count(count.total)} ({count.total:,})"),
        ("Parameters (active per token)", f"{human_count(count.active)} ({count.active:,})"),
        ("Layers", f"{config.num_hidden_layers} ({config.num_hidden_layers - n_moe} dense, {n_moe} MoE)"),
        ("Hidden size / dense FFN", f"{config.hidden_size} / {config.intermediate_size}"),
        ("Vocabulary / context", f"{config.vocab_size} / {config.max_position_embeddings}"),
        ("Attention", attention_summary(config)),
    ]
    if config.n_routed_experts:
        rows += [
            ("Routed experts", f"{config.n_routed_experts} per MoE layer, {config.num_experts_per_tok} active per "
                               f"token, width {config.moe_intermediate_size}"),
            ("Shared experts", f"{config.n_shared_experts} (total width {config.shared_intermediate_size}"
                               + (", gated)" if config.shared_expert_gate else ")")),
            ("Routing", routing_summary(config)),
            ("Load balancing", _balancing_row(config)),
        ]
    mtp = (f"{config.num_nextn_predict_layers} module(s), {human_count(count.mtp)} parameters (not in the total)"
           if config.num_nextn_predict_layers else "none")
    rows.append(("Multi-token prediction", mtp))

    title = repo_id.split("/")[-1] if repo_id else "hf_moe model"
    load_id = repo_id or "REPO_ID"
    lines = [
        f"# {title}", "",
        "A DeepSeek-style Mixture-of-Experts causal language model in the hf_moe format "
        f"(model_type `{MoEConfig.model_type}`, written by hf_moe {__version__}).", "",
        "## Architecture", "", *_table(rows, ("property", "value")), "",
    ]
    parts = [(part, f"{human_count(count.parts[part])} / {human_count(count.active_parts[part])}")
             for part in count.parts if count.parts[part] and part != "mtp"]
    lines += ["Parameters by part (total / active per token):", "", *_table(parts, ("part", "parameters")), ""]
    if recipe:
        lines += ["## Upcycling", "", f"Initialised from the dense model `{source}` (sparse upcycling) with:", "",
                  *_table([(k, v) for k, v in recipe.items()], ("setting", "value")), ""]
    if balance:
        lines += ["## Expert load balance", "",
                  *_table([(k, _format_value(v)) for k, v in balance.items()], ("statistic", "value")), ""]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM", ""]
    if remote_code:
        lines += ["# the repository carries its modeling code: hf_moe need not be installed",
                  f'model = AutoModelForCausalLM.from_pretrained("{load_id}", trust_remote_code=True)']
    else:
        lines += ["import hf_moe  # pip install hf-moe; registers model_type \"hf_moe\"", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{load_id}")']
    lines += ["```", ""]
    return f"---\n{front_matter}\n---\n\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------- folders, upload
#: Files copied from a saved folder besides its weights: config, generation defaults and tokenizer files. Nothing
#: else is copied (no pickles such as pytorch_model.bin or optimizer.pt, no code, no dotfiles, no data files); the
#: card and the modeling code are written by hf_moe itself.
PUBLISHED_SIDE_FILES = ("config.json", *SIDE_FILES)


def publishable_files(folder: str | os.PathLike) -> list[str]:
    """The files of a saved hf_moe folder that go into a Hub folder: the safetensors weights its index names
    (checked to lie inside the folder) or `model.safetensors`, the index, and `PUBLISHED_SIDE_FILES` that exist.
    Everything else is left out (and logged; not the modeling files `save_pretrained` writes, which hf_moe writes
    afresh where remote code is wanted)."""
    folder = Path(folder)
    weights = _weight_files(folder)
    index = [SAFE_WEIGHTS_INDEX_NAME] if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file() else []
    names = [*weights, *index, *(n for n in PUBLISHED_SIDE_FILES if (folder / n).exists() or (folder / n).is_symlink())]
    ours = {"README.md", *(f.name for f in remote_code_files())}
    left_out = sorted(p.name for p in folder.iterdir() if p.name not in names and p.name not in ours)
    if left_out:
        logger.warning("Not published from %s (not weights, config or tokenizer files): %s", folder, left_out)
    return names


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of a saved hf_moe folder (index entries checked to stay inside it); raises where
    there are none (pickle-only folders) or the config is not an hf_moe one."""
    _read_config(folder)
    if not ((folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()):
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (it has {others[:3]}, but no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})" if others else ""
        raise ValueError(f"{folder} holds no *.safetensors weights{hint}; hf_moe publishes safetensors only.")
    with SourceCheckpoint(folder) as checkpoint:
        return list(checkpoint.files)


def _same_folder(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _copy_saved_folder(source: Path, out: Path) -> None:
    """Copy the publishable files of a saved hf_moe folder (`publishable_files`) into `out`, regular files inside
    the folder only (`hf_moe.files.copy_inside`: symlinks leading out of it are skipped)."""
    copy_inside(source, out, publishable_files(source))


def save_for_hub(
    model_or_dir: MoEPreTrainedModel | str | os.PathLike,
    out: str | os.PathLike,
    *,
    remote_code: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    balance: Mapping[str, object] | None = None,
    tags: Sequence[str] = (),
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a Hub-ready folder and return it: safetensors weights (+ index), config.json,
    generation_config.json, README.md (`model_card`), the tokenizer if given and, with `remote_code`, the
    modeling files + `auto_map` (`export_remote_code`); without it a stale `auto_map` is removed.

    A model is saved in shards of at most `max_shard_size`; from a saved folder only `publishable_files` are
    copied (weights, config, generation defaults, tokenizer files: never pickles, code, dotfiles or symlinks
    leading out of it), or the folder is completed in place when `out` is that folder. The card is built before
    anything is written; the folder is written next to `out` and swapped in when complete, so a failure or a
    kill leaves an earlier `out` as it was. A non-empty `out` raises FileExistsError unless `overwrite`; an `out`
    that contains the source folder or lies inside it is refused.
    """
    out = Path(out)
    parse_size(max_shard_size)
    if isinstance(model_or_dir, MoEPreTrainedModel):
        source, described = None, model_or_dir
    elif isinstance(model_or_dir, (str, os.PathLike)):
        source = Path(model_or_dir)
        _read_config(source)
        described = MoEConfig.from_pretrained(source)
    else:
        raise TypeError(f"save_for_hub needs an hf_moe model or a saved folder, got {type(model_or_dir).__name__}.")
    card = model_card(described, repo_id=repo_id, license=license, base_model=base_model, balance=balance, tags=tags,
                      remote_code=remote_code)  # a bad card field fails here, before anything is written

    def complete(folder: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if remote_code:
            add_remote_code(folder)
        else:  # also what save_pretrained wrote, when publishing a saved folder in place
            config = _read_config(folder)
            if config.pop("auto_map", None) is not None:
                _write_config(folder, config)
            for file in remote_code_files():
                (folder / file.name).unlink(missing_ok=True)
        write_text_atomic(folder / "README.md", card)

    if source is not None and _same_folder(source, out):  # publishing a saved folder in place only adds files
        _weight_files(source)
        complete(out)
        return out
    with atomic_output_dir(out, overwrite, src=source) as tmp:
        if source is None:
            model_or_dir.save_pretrained(tmp, max_shard_size=max_shard_size, remote_code=remote_code)
        else:
            _copy_saved_folder(source, tmp)
        complete(tmp)
    return out


def push_to_hub(
    model_or_dir: MoEPreTrainedModel | str | os.PathLike,
    repo_id: str,
    *,
    remote_code: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload hf_moe model",
    license: str | None = None,
    base_model: str | None = None,
    balance: Mapping[str, object] | None = None,
    tags: Sequence[str] = (),
    max_shard_size: int | str = "5GB",
) -> CommitInfo:
    """Create `repo_id` if needed and upload `save_for_hub`'s folder (written to a temporary directory) in one
    commit. Weight shards and modeling files left from an earlier upload are deleted in the same commit, so the
    repository matches the folder. Returns huggingface_hub's CommitInfo."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    stale = ["*.safetensors", "model.safetensors.index.json", *(f.name for f in remote_code_files())]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_for_hub(model_or_dir, tmp, remote_code=remote_code, tokenizer=tokenizer, repo_id=repo_id,
                              license=license, base_model=base_model, balance=balance, tags=tags,
                              max_shard_size=max_shard_size)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr, delete_patterns=stale)


# ------------------------------------------------------------------------------- hooks of the model classes
def _card_for_save(model: MoEPreTrainedModel, remote_code: bool) -> str:
    """The "model_card" hook: the card `MoEPreTrainedModel.save_pretrained` writes into a folder without one."""
    return model_card(model, remote_code=remote_code)


def _push_for_model(model: MoEPreTrainedModel, repo_id: str, **kwargs: Any) -> CommitInfo:
    """The "push_to_hub" hook: `MoEPreTrainedModel.push_to_hub` uploads through `push_to_hub` above."""
    return push_to_hub(model, repo_id, **kwargs)


def _remote_code_for_save(folder: str | os.PathLike) -> None:
    """The "remote_code" hook: `MoEPreTrainedModel.save_pretrained` adds the modeling files and `auto_map`."""
    add_remote_code(folder)


# the model classes never import hf_moe: they find these in their seam, where `import hf_moe` puts them
register_kernel("model_card", _card_for_save)
register_kernel("remote_code", _remote_code_for_save)
register_kernel("push_to_hub", _push_for_model)

__all__ = [
    "AUTO_MAP",
    "REMOTE_CODE_PACKAGES",
    "add_remote_code",
    "check_remote_code_imports",
    "export_remote_code",
    "model_card",
    "publishable_files",
    "push_to_hub",
    "remote_code_files",
    "save_for_hub",
]
