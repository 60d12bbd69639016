"""The demo's pretraining corpus, found on every machine: Python's own standard-library sources.

`stdlib_sources()` lists the .py files of the running interpreter's standard library (no network, no
download), `train_tokenizer()` trains a byte-level BPE tokenizer on them with `tokenizers`, and
`build_lm_datasets()` reads them with `datasets`' local "text" loader, tokenizes, and packs the token stream
into fixed-length blocks for causal-LM training (labels = inputs; the model shifts them).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_sources(max_bytes: int | None = None, root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's .py files (tests and third-party packages excluded), in a fixed order, up to
    `max_bytes` in total (None: all, several tens of MB). `root` overrides the standard-library folder."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names) if name.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"stdlib_sources(root={str(root)!r}): no .py files found there.")
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        if max_bytes is not None and total + size > max_bytes:
            if chosen:
                continue  # keep looking for smaller files that still fit
        chosen.append(path)
        total += size
        if max_bytes is not None and total >= max_bytes:
            break
    return chosen


def train_tokenizer(files: list[Path], vocab_size: int = 4096, min_frequency: int = 2) -> Any:
    """Byte-level BPE (GPT-2 style) trained on `files` with `tokenizers`; returned as a transformers
    PreTrainedTokenizerFast with pad/bos/eos = ids 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train([str(path) for path in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def build_lm_datasets(
    files: list[Path],
    tokenizer: Any,
    block_size: int = 128,
    eval_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> Any:
    """DatasetDict {"train", "eval"} of blocks {"input_ids", "labels"} of `block_size` tokens: every file is one
    document (datasets' "text" loader, sample_by="document"), tokenized and followed by EOS, then the stream
    is cut into blocks (the tail shorter than a block is dropped). `eval_fraction` of the blocks go to eval."""
    from datasets import load_dataset

    if not 0 < eval_fraction < 1:
        raise ValueError(f"build_lm_datasets(eval_fraction={eval_fraction!r}) is invalid: must be in (0, 1).")
    raw = load_dataset("text", data_files={"train": [str(p) for p in files]}, sample_by="document",
                       cache_dir=None if cache_dir is None else str(cache_dir), split="train")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=num_proc)
    blocks = tokens.map(pack, batched=True, batch_size=1000, num_proc=num_proc)
    if len(blocks) < 2:
        raise ValueError(f"build_lm_datasets: the corpus gives {len(blocks)} block(s) of {block_size} tokens; "
                         "give it more files or a smaller block_size.")
    split = blocks.train_test_split(test_size=max(eval_fraction, 1 / len(blocks)), seed=seed)
    split["eval"] = split.pop("test")
    return split.with_format("torch")
