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


def test_select_experts_writes_the_esft_selection(tmp_path, capsys) -> None:
    from hf_moe import MoEForCausalLM
    from hf_moe.demo.corpus import stdlib_sources, train_tokenizer
    from hf_moe.training.expert_selection import load_expert_selection
    from tests.conftest import tiny_config

    tokenizer = train_tokenizer(stdlib_sources(max_bytes=40_000), vocab_size=300)
    model = MoEForCausalLM(tiny_config(vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "task.txt").write_text("def add(a, b):\n    return a + b\nclass Point:\n    x = 1\n")
    assert main(["select-experts", str(tmp_path / "model"), str(tmp_path / "task.txt"), "--criterion", "token",
                 "--output", str(tmp_path / "experts.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    selection = load_expert_selection(tmp_path / "experts.json")
    assert sorted(selection) == [1, 2] == sorted(int(k) for k in printed)
    assert all(0 < len(experts) <= 8 for experts in selection.values())
