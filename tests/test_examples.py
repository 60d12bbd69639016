"""The examples run end to end (a couple of steps each) and print what they promise."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from hf_moe.training.data import load_local_texts, token_blocks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("script", "expected"), [
    ("finetune_lora.py", "base + saved adapter vs trained model: max |logit difference|"),
    ("finetune_sft_trl.py", "moe/mtp_loss"),
    ("finetune_esft.py", "base + delta == finetuned model: True"),
    ("finetune_upcycle.py", "routed experts bit-identical after finetuning: True"),
])
def test_finetuning_example_runs(script: str, expected: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--steps", "2", "--out", str(tmp_path / "out")])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert expected in capsys.readouterr().out


def test_local_texts_and_token_blocks(tmp_path) -> None:
    (tmp_path / "task.txt").write_text("alpha beta\ngamma\n")
    (tmp_path / "task.jsonl").write_text('{"prompt": "x", "text": "one"}\n{"prompt": "y", "text": "two"}\n')
    assert load_local_texts(tmp_path / "task.txt") == ["alpha beta", "gamma"]
    assert load_local_texts(tmp_path / "task.jsonl") == ["one", "two"]
    with pytest.raises(ValueError, match="column='answer'"):
        load_local_texts(tmp_path / "task.jsonl", column="answer")
    with pytest.raises(ValueError, match="allowed are .txt, .json and .jsonl"):
        load_local_texts(tmp_path / "task.csv")
    blocks = token_blocks(["abcde", "fgh"], lambda text: [ord(c) for c in text], 3)
    assert blocks["input_ids"] == [[97, 98, 99], [100, 101, 102]] and blocks["labels"] == blocks["input_ids"]
