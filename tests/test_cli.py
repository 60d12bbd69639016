"""The `hf-moe` command: each subcommand makes its library call and reports clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.cli import main
from tests.conversion.families.oracle import probe_ids
from tests.conversion.test_upcycle import dense_checkpoint


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
    from hf_moe.training.data import stdlib_sources, train_tokenizer
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


def _subparser(name: str) -> argparse.ArgumentParser:
    from hf_moe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_upcycle_flags_are_the_recipe_fields() -> None:
    """Every UpcycleRecipe field is one flag with its type, default, choices and help; the other flags are the
    IO options of `upcycle` itself (so the recipe cannot be spelled twice)."""
    from hf_moe.conversion.upcycle_recipe import UpcycleRecipe

    actions = {a.dest: a for a in _subparser("upcycle")._actions if a.dest != "help"}
    hints = typing.get_type_hints(UpcycleRecipe)
    recipe_fields = dataclasses.fields(UpcycleRecipe)
    io_options = {"src", "out", "probe_text", "no_probe", "max_shard_size", "base_model", "overwrite"}
    assert set(actions) == {f.name for f in recipe_fields} | io_options
    for field in recipe_fields:
        action = actions[field.name]
        assert action.help == field.metadata["help"] and action.choices == field.metadata.get("choices"), field.name
        if field.default is dataclasses.MISSING:
            assert action.required, field.name
        else:
            assert action.default == field.default and not action.required, field.name
        if hints[field.name] is bool:
            assert action.nargs == 0 and action.const is True, field.name  # a switch
        else:
            assert action.type is hints[field.name], field.name
    assert actions["num_experts"].option_strings == ["--experts"] and actions["shared_experts"].option_strings == [
        "--shared"]  # the metadata's flag (DESIGN's spelling)
    assert actions["first_k_dense_replace"].option_strings == ["--first-k-dense-replace"]


def test_upcycle_cli_builds_the_recipe_from_every_flag(tmp_path, monkeypatch) -> None:
    from hf_moe.conversion import upcycle as upcycle_module
    from hf_moe.conversion.upcycle_recipe import UpcycleRecipe

    seen = {}
    monkeypatch.setattr(upcycle_module, "upcycle", lambda src, out, recipe, **io: seen.update(recipe=recipe, io=io))
    assert main(["upcycle", "a", "b", "--experts", "6", "--top-k", "4", "--granularity", "3", "--shared", "1",
                 "--shared-expert-gate", "--drop-ratio", "0.25", "--scale-on", "routed_scaling_factor", "--seed", "7",
                 "--no-probe", "--probe-text", "x", "--probe-text", "y"]) == 0  # fmt: skip
    assert seen["recipe"] == UpcycleRecipe(num_experts=6, top_k=4, granularity=3, shared_experts=1,
                                           shared_expert_gate=True, drop_ratio=0.25, scale_on="routed_scaling_factor",
                                           seed=7)  # fmt: skip
    assert seen["io"] == dict(probe=False, probe_texts=["x", "y"], overwrite=False, max_shard_size="2GB",
                              base_model=None)  # fmt: skip


def test_convert_cli_passes_layout_and_shard_size(tmp_path, monkeypatch, capsys) -> None:
    from hf_moe.conversion import convert as convert_module

    seen = {}
    monkeypatch.setattr(convert_module, "convert", lambda src, out, **kw: seen.update(kw) or "converted")
    assert main(["convert", "a", "b", "--to", "mixtral", "--layout", "transformers", "--max-shard-size", "1GB"]) == 0
    assert seen == dict(to="mixtral", layout="transformers", max_shard_size="1GB", overwrite=False)
    assert "converted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--layout", "fused"])
