"""Finetuning data from local files: texts from .txt / .json / .jsonl (`load_local_texts`) packed into
fixed-length causal-LM blocks (`token_blocks`), as the examples and `hf-moe analyze` read them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_local_texts(path: str | os.PathLike, column: str = "text") -> list[str]:
    """The texts of a local .txt (one sample per line), .json or .jsonl file, read with `datasets`."""
    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    kind = {".txt": "text", ".json": "json", ".jsonl": "json"}.get(suffix)
    if kind is None:
        raise ValueError(f"path={str(path)!r} has suffix {suffix!r}; allowed are .txt, .json and .jsonl.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (or is not a file).")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty: expected one sample per line (.txt) or JSON records.")
    try:
        dataset = load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in generic ones: name the file and the real cause
        cause = error.__cause__ or error
        raise ValueError(f"data file {str(path)!r} cannot be read as {suffix} data: {cause}") from error
    if len(dataset) == 0:
        raise ValueError(f"data file {str(path)!r} holds no samples.")
    if column not in dataset.column_names:
        raise ValueError(f"column={column!r} is not in {str(path)!r}; its columns are {dataset.column_names}.")
    return dataset[column]


def token_blocks(texts: list[str], encode: Any, block_size: int) -> Any:
    """Concatenate `encode(text)` over `texts` and cut the stream into `block_size`-token rows: a datasets.Dataset
    with `input_ids` and `labels` (equal; the model shifts them), the tail shorter than a block dropped."""
    from datasets import Dataset

    ids = [token for text in texts for token in encode(text)]
    rows = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})
