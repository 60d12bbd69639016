"""The analysis's data: local text files (one per domain), checked, tokenized and cut into sequences.

Each file is read as UTF-8 text in pieces of whole lines (never all at once), each piece tokenized without
special tokens, and the token stream cut into sequences of `seq_len` tokens (the last, shorter one kept), up
to `max_tokens` tokens per file. A tokenizer that starts its inputs with BOS (Llama-style) gets BOS in front
of every sequence, as in its training; BOS is fed to the model but not traced.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_PIECE_CHARS = 1 << 16  # text tokenized at once (cut at a line end)
_BINARY_PROBE = 1 << 13


class DataFileError(ValueError):
    """A data file that cannot be analysed (missing, unreadable, empty, binary, not UTF-8)."""


@dataclass
class TokenSequence:
    """One model input: `domain` (index of its data file), `input_ids` (1-D), `prefix` tokens (BOS) that are
    fed to the model but not traced."""

    domain: int
    input_ids: torch.Tensor
    prefix: int = 0


def check_text_file(path: str | os.PathLike) -> Path:
    """`path` if it is a readable, non-empty UTF-8 text file; else a DataFileError naming the file and why."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"data file {str(path)!r} does not exist.")
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} is not a file (a folder?): give text files, one per domain.")
    try:
        with path.open("rb") as handle:
            head = handle.read(_BINARY_PROBE)
    except OSError as error:
        raise DataFileError(f"data file {str(path)!r} cannot be read: {error.strerror or error}.") from error
    if not head:
        raise DataFileError(f"data file {str(path)!r} is empty: each data file must hold text of its domain.")
    if (nul := head.find(b"\x00")) >= 0:
        raise DataFileError(f"data file {str(path)!r} is binary (NUL byte at offset {nul}): give UTF-8 text files.")
    return path


def read_text_pieces(path: str | os.PathLike, piece_chars: int = _PIECE_CHARS) -> Iterator[str]:
    """The file's text in pieces of about `piece_chars` characters ending at a line end, decoded as UTF-8
    incrementally; a DataFileError names the byte offset of undecodable or NUL bytes."""
    path = check_text_file(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, offset = "", 0
    with path.open("rb") as handle:
        while chunk := handle.read(piece_chars):
            if (nul := chunk.find(b"\x00")) >= 0:
                raise DataFileError(f"data file {str(path)!r} is binary (NUL byte at offset {offset + nul}).")
            try:
                pending += decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataFileError(
                    f"data file {str(path)!r} is not UTF-8 text (undecodable byte at offset {offset + error.start})."
                ) from error
            offset += len(chunk)
            cut = pending.rfind("\n") + 1
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
        try:
            pending += decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise DataFileError(f"data file {str(path)!r} is not UTF-8 text (it ends inside a character).") from error
    if pending:
        yield pending


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos_token_id] if the tokenizer puts BOS in front of its inputs by default, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def file_sequences(
    path: str | os.PathLike, domain: int, tokenizer: Any, seq_len: int, max_tokens: int | None = None
) -> Iterator[TokenSequence]:
    """The traced sequences of one data file: `seq_len` tokens each (BOS included where the tokenizer adds
    it), at most `max_tokens` traced tokens in all. Raises DataFileError if the file gives no token."""
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} is too short: it must be at least {len(prefix) + 1}.")
    stream: list[int] = []
    emitted, has_text = 0, False

    def cut(ids: list[int]) -> TokenSequence:
        return TokenSequence(domain, torch.tensor(prefix + ids, dtype=torch.long), prefix=len(prefix))

    for text in read_text_pieces(path):
        has_text = has_text or not text.isspace()
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(stream) >= body:
            take = body if max_tokens is None else min(body, max_tokens - emitted)
            yield cut(stream[:take])
            emitted += take
            stream = stream[body:]
            if max_tokens is not None and emitted >= max_tokens:
                return
    if not has_text:
        raise DataFileError(f"data file {str(path)!r} holds only whitespace: each data file must hold text of its domain.")
    if stream:
        take = stream if max_tokens is None else stream[: max_tokens - emitted]
        emitted += len(take)
        yield cut(take)
    if not emitted:
        raise DataFileError(f"data file {str(path)!r} gives no tokens with this tokenizer.")
