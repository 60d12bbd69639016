"""Streaming checkpoint IO: read a safetensors folder lazily, write size-capped shards with an index, atomically.

Peak memory of a conversion built on these pieces is the largest output shard (what `ShardedWriter` buffers)
plus what the caller holds at once (one decoder layer for `hf_moe.upcycle`), never the whole model:

    source = SourceCheckpoint(src)                         # config.json + safetensors headers, nothing loaded
    with atomic_output_dir(out, overwrite=False) as tmp:   # tmp folder next to `out`, renamed when complete
        writer = ShardedWriter(tmp, max_shard_size="2GB")
        for key, tensor in source.iter_tensors():          # shard by shard, one tensor at a time (mmap)
            writer.add(key, tensor)
        writer.finish()                                    # names shards model-0000i-of-0000n, writes the index
        copy_side_files(src, tmp)                          # tokenizer files, generation_config.json

File names and the index format are transformers' (`model.safetensors` when one shard is enough, else
`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`), so `from_pretrained` reads the result.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..files import UnsafePathError, atomic_output_dir, check_output_dir, copy_inside, read_json, resolve_inside

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
#: The files a saved tokenizer consists of (transformers' names; sentencepiece models under their usual names).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip
#: Files copied verbatim from the source folder when present (tokenizer and generation defaults).
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES)
DEFAULT_MAX_SHARD_SIZE = "2GB"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_UNIT_NAMES = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted (missing files or keys, wrong shapes, unknown family)."""


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The `TOKENIZER_FILES` present in `folder`: empty when the folder holds no tokenizer at all."""
    return [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def open_safetensors(path: str | os.PathLike) -> Any:
    """safetensors' `safe_open(path)`, with an error naming the file when its header is broken or it is cut short."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}): the file is damaged or "
                              "incomplete; download or save it again.") from error  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or a string like "500MB", "2GB", "1.5GiB" (transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size!r} is invalid: must be positive.")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or int(float(match.group(1)) * _UNITS[unit]) <= 0:
        raise ValueError(f"max_shard_size={size!r} is invalid: use a positive number of bytes, or a number with one "
                         f"of the units {_UNIT_NAMES} (e.g. '500MB', '2GB').")
    return int(float(match.group(1)) * _UNITS[unit])


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ------------------------------------------------------------------------------------------------ reading
class SourceCheckpoint:
    """A model folder read lazily: `config` (the config.json dict) and tensors by key through safetensors'
    `safe_open` (memory-mapped; `get` copies one tensor). Missing shards raise `CheckpointError` at open."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"Source {str(self.folder)!r} is not a folder (expected a saved model folder).")
        config_path = self.folder / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"Source {str(self.folder)!r} has no {CONFIG_NAME}.")
        self.config: dict[str, Any] = read_json(config_path)
        self.weight_map = self._read_weight_map()
        self.files = list(dict.fromkeys(self.weight_map.values()))  # shard order of the index
        missing = [name for name in self.files if not (self.folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"Source {str(self.folder)!r} is missing {len(missing)} of its {len(self.files)} weight shards listed "
                f"in {SAFE_WEIGHTS_INDEX_NAME}: {missing[:5]}{' ...' if len(missing) > 5 else ''}."
            )
        self._handles: dict[str, Any] = {}
        self._slices: dict[str, Any] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name -> shard file name).")
            for file in dict.fromkeys(weight_map.values()):  # names outside the folder are refused, as transformers does
                key = next(k for k, f in weight_map.items() if f == file)
                resolve_inside(self.folder, file, source=f"{index_path} entry {key!r}")
                if not file.endswith(".safetensors") or os.path.basename(file).startswith("."):
                    raise UnsafePathError(f"{index_path} entry {key!r} names {file!r}: shards must be visible "
                                          "'.safetensors' files (nothing else is read, copied or published).")
            return dict(weight_map)
        single = self.folder / SAFE_WEIGHTS_NAME
        if single.is_file():
            resolve_inside(self.folder, SAFE_WEIGHTS_NAME)
            with open_safetensors(single) as handle:
                return dict.fromkeys(handle.keys(), SAFE_WEIGHTS_NAME)
        others = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" It has {others[:3]}: re-save it with save_pretrained (safetensors is the default)." if others else ""
        raise CheckpointError(
            f"Source {str(self.folder)!r} has no safetensors weights ({SAFE_WEIGHTS_NAME} or "
            f"{SAFE_WEIGHTS_INDEX_NAME}).{hint}"
        )

    # metadata ---------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = open_safetensors(self.folder / file)
        return self._handles[file]

    def _slice(self, key: str) -> Any:
        if key not in self.weight_map:
            raise CheckpointError(f"Source {str(self.folder)!r} has no tensor {key!r}.")
        if key not in self._slices:
            self._slices[key] = self._handle(self.weight_map[key]).get_slice(key)
        return self._slices[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._slice(key).get_dtype()]

    def nbytes(self, key: str) -> int:
        numel = 1
        for dim in self.shape(key):
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype(key)).element_size()

    def total_bytes(self) -> int:
        return sum(self.nbytes(key) for key in self.weight_map)

    # data -------------------------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard (a fresh CPU tensor the caller owns)."""
        if key not in self.weight_map:
            raise CheckpointError(f"Source {str(self.folder)!r} has no tensor {key!r}.")
        return self._handle(self.weight_map[key]).get_tensor(key)

    def iter_tensors(self, progress: bool = True, desc: str = "reading") -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) one at a time, shard by shard in index order, with a progress bar over bytes; each
        shard's memory map is released once its tensors are read."""
        with tqdm(total=self.total_bytes(), unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            for file in self.files:
                for key in [k for k, f in self.weight_map.items() if f == file]:
                    tensor = self.get(key)
                    bar.update(tensor_nbytes(tensor))
                    yield key, tensor
                self.release()

    def release(self) -> None:
        """Close the shards' memory maps: pages read so far stop counting in this process's resident memory
        (they stay in the page cache). Later reads reopen the shard."""
        self._slices.clear()
        self._handles.clear()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ writing
class ShardedWriter:
    """Buffers tensors and writes a safetensors shard whenever the next tensor would push the buffer past
    `max_shard_size` (a larger tensor gets a shard of its own). `finish` renames the shards to transformers'
    names and writes `model.safetensors.index.json` (or a single `model.safetensors`)."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self._keys: set[str] = set()
        self._pointers: set[int] = set()
        self.total_size = 0
        self.largest_shard = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"Tensor {key!r} was written twice.")
        size = tensor_nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self.flush()
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        elif tensor.untyped_storage().nbytes() != size or tensor.data_ptr() in self._pointers:
            tensor = tensor.clone()  # a view (it would pin its base) or a tensor already buffered (tied weights)
        self._buffer[key] = tensor
        self._pointers.add(tensor.data_ptr())
        self._buffer_bytes += size
        self._keys.add(key)
        self.total_size += size

    def flush(self) -> None:
        """Write the buffered tensors as the next shard."""
        if not self._buffer:
            return
        name = f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._buffer, self.folder / name, metadata={"format": "pt"})
        self._shards.append((name, list(self._buffer)))
        self.largest_shard = max(self.largest_shard, self._buffer_bytes)
        self._buffer, self._buffer_bytes, self._pointers = {}, 0, set()

    def finish(self) -> dict[str, Any]:
        """Flush, give the shards their final names and write the index; returns the index dict."""
        self.flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for number, (name, keys) in enumerate(self._shards, start=1):
            final = SAFE_WEIGHTS_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / name, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        if count > 1:
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index


# ------------------------------------------------------------------------------------------ output folder
# `check_output_dir` and `atomic_output_dir` (temporary sibling, swap with rollback, stale leftovers tidied,
# SIGTERM like Ctrl-C) live in `hf_moe.files`, with the other rules for safe paths.
def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """Copy the tokenizer files and generation_config.json that exist in `src` (regular files inside `src` only,
    never symlinks leading out of it: `hf_moe.files.copy_inside`); returns the copied names."""
    return copy_inside(src, dst, names)


def rewrite_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    transform: Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
    write_config: Callable[[Path], None],
    *,
    finalize: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Stream every tensor of `src` through `transform(key, tensor) -> [(new_key, new_tensor), ...]` (it may
    hold tensors back and emit them later, e.g. once all experts of a layer arrived; `finalize()` emits what
    is left) into `out`, atomically. `write_config(folder)` writes config.json. Returns the output index."""
    parse_size(max_shard_size)
    check_output_dir(out, overwrite, src)
    with SourceCheckpoint(src) as source, atomic_output_dir(out, overwrite, src) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for key, tensor in source.iter_tensors(progress=progress, desc="converting"):
            for new_key, new_tensor in transform(key, tensor):
                writer.add(new_key, new_tensor)
        for new_key, new_tensor in finalize() if finalize is not None else ():
            writer.add(new_key, new_tensor)
        write_config(tmp)
        copy_side_files(src, tmp)
        return writer.finish()


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "SIDE_FILES",
    "TOKENIZER_FILES",
    "CheckpointError",
    "ShardedWriter",
    "SourceCheckpoint",
    "atomic_output_dir",
    "check_output_dir",
    "copy_side_files",
    "open_safetensors",
    "parse_size",
    "rewrite_checkpoint",
    "tensor_nbytes",
    "tokenizer_files",
]
