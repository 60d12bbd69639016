"""The offline pretraining corpus (standard-library sources), tokenizer, packed datasets, and a tiny end-to-end
`run_pretraining` (the function behind examples/pretrain_mtp.py and `hf-moe demo`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe import MoEForCausalLM
from hf_moe.training.data import build_lm_datasets, stdlib_sources, train_tokenizer
from hf_moe.training.pretrain import run_pretraining


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


def test_run_pretraining_end_to_end(tmp_path) -> None:
    lines: list[str] = []
    result = run_pretraining(
        tmp_path, max_steps=4, corpus_bytes=120_000, vocab_size=512, block_size=32, batch_size=4, eval_batches=1,
        logging_steps=2, acceptance_prompts=1, print_fn=lines.append,
        config_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, n_routed_experts=8,
                              q_lora_rank=None, kv_lora_rank=32),
    )
    assert isinstance(result.model, MoEForCausalLM) and result.model.mtp is not None
    for key in ("train_loss", "eval_loss", "eval_max_vio", "train_max_vio_first", "mtp_acceptance",
                "mtp_tokens_per_forward"):
        assert key in result.metrics and result.metrics[key] == result.metrics[key], key  # present, not NaN
    assert [entry["step"] for entry in result.callback.history] == [1, 2, 3, 4]
    assert sum("MaxVio" in line and "mtp" in line for line in lines) == 2  # one line per log (steps 2 and 4)
    assert any("drafts accepted" in line for line in lines)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(result.metrics["eval_loss"]) and "layer_1" in saved["eval_expert_load"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.model.layers[1].mlp.gate.e_score_correction_bias,
                       result.model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert tokenizer.decode(tokenizer("x = 1")["input_ids"]) == "x = 1"
