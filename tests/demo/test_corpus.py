"""The demo's offline pretraining corpus (standard-library sources), tokenizer and packed datasets."""

from __future__ import annotations

import pytest
import torch

from hf_moe.demo.corpus import build_lm_datasets, stdlib_sources, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus() -> tuple[list, object]:
    files = stdlib_sources(max_bytes=150_000)
    return files, train_tokenizer(files, vocab_size=512)


def test_stdlib_sources_are_python_files_within_budget(corpus: tuple) -> None:
    files, _ = corpus
    assert files == stdlib_sources(max_bytes=150_000)  # deterministic
    assert all(path.suffix == ".py" for path in files)
    assert not any(part in {"site-packages", "test", "tests"} for path in files for part in path.parts)
    assert sum(path.stat().st_size for path in files) <= 150_000
    assert len(stdlib_sources()) > 100  # the whole standard library


def test_tokenizer_is_lossless_byte_level_bpe_with_special_ids(corpus: tuple) -> None:
    _, tokenizer = corpus
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 512
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())


def test_datasets_are_packed_blocks_of_the_token_stream(corpus: tuple, tmp_path) -> None:
    files, tokenizer = corpus
    data = build_lm_datasets(files, tokenizer, block_size=64, eval_fraction=0.1, cache_dir=tmp_path)
    train, evaluation = data["train"], data["eval"]
    assert len(train) > 10 and len(evaluation) >= 1
    row = train[0]
    assert row["input_ids"].shape == (64,) and torch.equal(row["input_ids"], row["labels"])
    stream = []
    for path in files:
        stream += tokenizer(path.read_text())["input_ids"] + [tokenizer.eos_token_id]
    blocks = {tuple(stream[i:i + 64]) for i in range(0, len(stream) // 64 * 64, 64)}
    assert len(train) + len(evaluation) == len(blocks)
    assert all(tuple(r["input_ids"].tolist()) in blocks for r in (train[0], train[len(train) - 1], evaluation[0]))
