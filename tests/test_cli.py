"""The `hf-moe` command: each subcommand makes its library call and reports clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe import MoEForCausalLM
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
    io_options = {"src", "out", "probe_text", "no_probe", "max_shard_size", "base_model", "no_remote_code", "overwrite",
                  "debug"}
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
                              base_model=None, remote_code=True)  # fmt: skip


def test_convert_cli_passes_layout_and_shard_size(tmp_path, monkeypatch, capsys) -> None:
    from hf_moe.conversion import convert as convert_module

    seen = {}
    monkeypatch.setattr(convert_module, "convert", lambda src, out, **kw: seen.update(kw) or "converted")
    assert main(["convert", "a", "b", "--to", "mixtral", "--layout", "transformers", "--max-shard-size", "1GB"]) == 0
    assert seen == dict(to="mixtral", layout="transformers", max_shard_size="1GB", overwrite=False, remote_code=True)
    assert "converted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--layout", "fused"])


# ------------------------------------------------------------------------------------- errors, one line each
def error_line(capsys) -> str:
    """The command's one error line (progress bars aside), checked to come without a traceback. Reports of
    logging handlers left on a closed capture stream by earlier tests (pytest + logging) are not the command's."""
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    lines = [line for line in err.splitlines() if line.startswith("hf-moe")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("args", "named"), [
    (["select-experts", "m", "d.txt", "--max-length", "-1"], ["--max-length", "-1", "positive integer"]),
    (["select-experts", "m", "d.txt", "--max-tokens", "0"], ["--max-tokens", "0", "positive integer"]),
    (["select-experts", "m", "d.txt", "--threshold", "2"], ["--threshold", "2", "(0, 1]"]),
    (["demo", "--max-steps", "-1"], ["--max-steps", "-1", "positive integer"]),
    (["demo", "--max-steps", "many"], ["--max-steps", "'many'", "not an integer"]),
    (["upcycle", "a", "b", "--experts", "2", "--top-k", "1", "--max-shard-size", "12XB"],
     ["--max-shard-size", "'12XB'", "KB, MB, GB", "GiB"]),
    (["publish", "m", "o", "--max-shard-size", "0"], ["--max-shard-size", "'0'", "positive"]),
    (["upcycle", "a", "b", "--experts", "2"], ["required", "--top-k"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
])  # fmt: skip
def test_bad_option_values_are_refused_when_parsed(args: list[str], named: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    line = error_line(capsys)
    assert line.startswith("hf-moe: error: ") and all(text in line for text in named), line


def test_user_errors_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch) -> None:
    from tests.conftest import tiny_config

    model = tmp_path / "model"
    MoEForCausalLM(tiny_config()).save_pretrained(model)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{oops")
    tokenized = tmp_path / "tokenized"
    shutil.copytree(model, tokenized)
    (tokenized / "tokenizer.json").write_text("{}")  # enough to get to the data file, which is read first
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 2)
    missing = str(tmp_path / "missing")
    cases = [
        (["inspect", missing], [missing, "not a folder"]),
        (["inspect", str(tmp_path / "llama")], ["config.json", "model_type='llama'", "'hf_moe'"]),
        (["inspect", str(tmp_path / "broken")], ["config.json is not valid JSON", "line 1"]),
        (["inspect", str(model), "--preset", "deepseek-v3"], ["exactly one of DIR or --preset"]),
        (["convert", missing, str(tmp_path / "o")], [missing, "not a folder"]),
        (["upcycle", missing, str(tmp_path / "o"), "--experts", "2", "--top-k", "1"], [missing]),
        (["publish", str(model)], ["exactly one of OUT", "--push"]),
        (["publish", str(tmp_path / "llama"), str(tmp_path / "o")], ["model_type='llama'"]),
        (["select-experts", str(model), str(tmp_path / "empty.txt")], [str(model), "no tokenizer files"]),
        (["select-experts", str(tokenized), str(tmp_path / "empty.txt")], ["empty.txt", "is empty"]),
        (["select-experts", str(tokenized), str(tmp_path / "binary.jsonl")], ["binary.jsonl", "cannot be read"]),
        (["select-experts", str(tokenized), str(tmp_path / "none.txt")], ["none.txt", "does not exist"]),
    ]  # fmt: skip
    for args, named in cases:
        assert main(args) == 2, args
        line = error_line(capsys)
        assert line.startswith(f"hf-moe: error: {args[0]}: ") and all(text in line for text in named), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.jsonl", "broken", "empty.txt", "llama", "model",
                                                          "tokenized"]  # fmt: skip


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    import errno
    import os

    from tests.conftest import tiny_config

    MoEForCausalLM(tiny_config()).save_pretrained(tmp_path / "model")
    (tmp_path / "ro").mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):  # what mkdir says in a read-only folder (root ignores chmod)
        if Path(path).parent == tmp_path / "ro" and not Path(path).exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    for args in (["publish", str(tmp_path / "model"), str(tmp_path / "ro" / "hub")],
                 ["convert", str(tmp_path / "model"), str(tmp_path / "ro" / "ds"), "--to", "deepseek_v3"]):  # fmt: skip
        assert main(args) == 2
        line = error_line(capsys)
        assert "is not writable" in line and str(tmp_path / "ro") in line, line
    assert list((tmp_path / "ro").iterdir()) == []


def test_debug_shows_the_traceback_and_unexpected_errors_say_so(tmp_path, capsys, monkeypatch) -> None:
    missing = str(tmp_path / "missing")
    assert main(["--debug", "inspect", missing]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["inspect", missing, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("HF_MOE_DEBUG", "1")
    assert main(["inspect", missing]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("HF_MOE_DEBUG")

    import hf_moe.conversion.convert as convert_module

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[2, -1]' is invalid")

    monkeypatch.setattr(convert_module, "convert", broken)
    assert main(["convert", "a", "b"]) == 1
    line = error_line(capsys)
    assert "shape '[2, -1]' is invalid" in line and "unexpected RuntimeError" in line and "--debug" in line

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert", interrupted)
    assert main(["convert", "a", "b"]) == 130
    assert "hf-moe: interrupted" in error_line(capsys)
