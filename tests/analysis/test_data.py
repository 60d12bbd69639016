"""Data files: clear errors for what cannot be analysed; sequences cut as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_moe.analysis import DataFileError, check_text_file, file_sequences


class CharTokenizer:
    """One token per character; `bos` adds BOS in front of inputs like Llama's tokenizer."""

    def __init__(self, bos: bool = False) -> None:
        self.bos_token_id = 1 if bos else None
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + ord(c) % 50 for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


def test_bad_files_are_named_with_the_reason(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"PK\x03\x04\x00\x00 zip")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("  \n\n  \n")
    cases = {"missing.txt": "does not exist", "empty.txt": "is empty", "binary.bin": "binary .NUL byte at offset 4",
             "latin1.txt": "not UTF-8 text .undecodable byte at offset 3", "blank.txt": "only whitespace", "": "not a file"}
    for name, message in cases.items():
        with pytest.raises(DataFileError, match=message) as error:
            list(file_sequences(tmp_path / name, 0, CharTokenizer(), seq_len=8))
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_unreadable_file_is_a_clear_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the process may not read (simulated: the tests may run as root, who reads mode-000 files)."""
    path = tmp_path / "secret.txt"
    path.write_text("text")
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataFileError, match="secret.txt' cannot be read: Permission denied"):
        check_text_file(path)


def test_sequences_are_cut_at_seq_len_with_the_tail_kept(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij\n" * 3)  # 33 characters = 33 tokens
    seqs = list(file_sequences(path, 2, CharTokenizer(), seq_len=8))
    assert [s.input_ids.numel() for s in seqs] == [8, 8, 8, 8, 1] and all(s.domain == 2 and s.prefix == 0 for s in seqs)
    capped = list(file_sequences(path, 0, CharTokenizer(), seq_len=8, max_tokens=20))
    assert [s.input_ids.numel() for s in capped] == [8, 8, 4]


def test_bos_tokenizers_get_bos_in_front_of_every_sequence(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij\n" * 3)
    seqs = list(file_sequences(path, 0, CharTokenizer(bos=True), seq_len=8, max_tokens=14))
    assert [s.input_ids[0].item() for s in seqs] == [1, 1] and all(s.prefix == 1 for s in seqs)
    assert [s.input_ids.numel() - s.prefix for s in seqs] == [7, 7]  # max_tokens counts traced tokens only
    with pytest.raises(ValueError, match="seq_len=1 is too short"):
        list(file_sequences(path, 0, CharTokenizer(bos=True), seq_len=1))


def test_large_files_are_read_in_pieces(tmp_path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("é" * 10 + "\n" + "x" * 200_000 + "\n")  # a two-byte character and more than one piece
    total = sum(s.input_ids.numel() for s in file_sequences(path, 0, CharTokenizer(), seq_len=4096))
    assert total == 10 + 1 + 200_000 + 1
