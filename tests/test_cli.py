"""The `hf-moe` command: each subcommand makes its library call and reports clear errors."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from hf_moe.cli import main
from tests.conversion.test_upcycle import dense_checkpoint, probe_ids


def test_inspect_preset_prints_total_and_active(capsys) -> None:
    assert main(["inspect", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "37.55B" in out and "MLA" in out


def test_inspect_unknown_preset_is_a_clear_error(capsys) -> None:
    assert main(["inspect", "--preset", "deepseek-v9"]) == 2
    assert "deepseek-v9" in capsys.readouterr().err


def test_upcycle_then_inspect_then_publish(tmp_path, capsys) -> None:
    dense = dense_checkpoint(tmp_path / "dense", "qwen3")
    args = ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "8", "--top-k", "4",
            "--granularity", "4", "--scoring-func", "softmax"]
    assert main(args) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(probe_ids()).logits, dense(probe_ids()).logits, rtol=1e-5, atol=1e-5)
    assert main(args) == 2  # the output exists now: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err.lower()
    assert main(["inspect", str(tmp_path / "moe")]) == 0
    assert "top-4" in capsys.readouterr().out
    assert main(["publish", str(tmp_path / "moe"), str(tmp_path / "hub"), "--license", "apache-2.0"]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "license: apache-2.0" in card
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["auto_map"]
