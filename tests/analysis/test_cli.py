"""`hf-moe analyze`: every plot and the report written; clear one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import LlamaConfig

from hf_moe import MoEForCausalLM
from hf_moe.analysis.report import HOW_TO_READ
from hf_moe.cli import main

from ..conftest import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["expert_load.png", "balance_summary.png", "domain_specialisation.png", "token_specialisation.png", "position_specialisation.png",
         "coactivation.png", "drops_by_position.png", "early_routing_learning.png"]
SECTIONS = ["## Load balance", "## Domain specialisation", "## Token-id specialisation", "## Position specialisation",
            "## Co-activation", "## Drop towards the end", "## Early routing learning"]


def test_analyze_writes_every_plot_and_one_report(model_folder, tmp_path, capsys) -> None:
    shutil.copytree(model_folder / "model", tmp_path / "checkpoint-10")  # the final model itself: agrees fully
    perturbed = MoEForCausalLM.from_pretrained(model_folder / "model")
    with torch.no_grad():
        for name, param in perturbed.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(torch.randn_like(param))
    perturbed.save_pretrained(tmp_path / "checkpoint-5")
    out = tmp_path / "out"
    code = main(["analyze", str(model_folder / "model"), "--data", str(model_folder / "code.txt"),
                 str(model_folder / "prose.txt"), "--checkpoints", str(tmp_path / "checkpoint-10"),
                 str(tmp_path / "checkpoint-5"), "--max-tokens", "200", "--seq-len", "32", "--buckets", "4",
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
        assert f"]({name})" in report, name  # embedded in the report
    for heading in SECTIONS:
        assert heading in report
    assert report.count("*How to read this:*") == len(HOW_TO_READ) == len(SECTIONS)
    assert "Not run" not in report
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["tokens_per_domain"] == [200, 200]
    agreement = numbers["agreement"]["agreement"]
    assert numbers["agreement"]["steps"] == [5, 10]  # in training order, whatever the order given
    assert agreement[1] == [1.0] * len(numbers["layers"]) and all(a < 1.0 for a in agreement[0])
    assert f"| {numbers['layers'][0]} | 800 |" in report  # the load table: 400 tokens x top-2 slots
    assert [d["capacity_factor"] for d in numbers["drops"]] == [1.25, 1.25]  # dropless model: the what-if factor
    assert [d["group_by"] for d in numbers["drops"]] == ["batch", "sequence"]
    assert "what-if" in report


def test_analyze_without_checkpoints_or_second_file_says_what_did_not_run(model_folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["analyze", str(model_folder / "model"), "--data", str(model_folder / "code.txt"), "--max-tokens",
                 "64", "--seq-len", "32", "--output", str(out), "--capacity-factor", "1.0", "--no-plots"]) == 0
    report = (out / "report.md").read_text()
    assert "Not run: needs at least two data files" in report and "Not run: no checkpoints given" in report
    assert "![" not in report and not list(out.glob("*.png"))
    assert json.loads((out / "analysis.json").read_text())["drops"][0]["capacity_factor"] == 1.0


def _error_of(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what earlier steps printed (save_pretrained's progress bars)
    try:
        code = main(argv)
    except SystemExit as exited:  # option values are refused while parsing
        code = exited.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None) and err.startswith("hf-moe: error: analyze: ") and "\n" not in err, err
    assert "Traceback" not in err, err
    return err


def test_analyze_errors_are_one_clear_line(model_folder, tmp_path, capsys) -> None:
    model = str(model_folder / "model")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    vocab = MoEForCausalLM.config_class.from_pretrained(model_folder / "model").vocab_size
    MoEForCausalLM(tiny_config(vocab_size=vocab, num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1)).save_pretrained(tmp_path / "other")
    code = str(model_folder / "code.txt")
    assert "no data given" in _error_of(["analyze", model], capsys)
    assert "missing.txt' does not exist" in _error_of(["analyze", model, "--data", str(tmp_path / "missing.txt")], capsys)
    assert "empty.txt' is empty" in _error_of(["analyze", model, "--data", code, str(tmp_path / "empty.txt")], capsys)
    assert "data.bin' is binary" in _error_of(["analyze", model, "--data", str(tmp_path / "data.bin")], capsys)
    assert "dense llama model, not an MoE model" in _error_of(["analyze", str(tmp_path / "llama"), "--data", code], capsys)
    err = _error_of(["analyze", model, "--data", code, "--checkpoints", str(tmp_path / "other")], capsys)
    assert "n_routed_experts=4 but the model has n_routed_experts=8" in err and "other" in err
    err = _error_of(["analyze", model, "--data", code, "--capacity-factor", "-1"], capsys)
    assert "--capacity-factor" in err and "-1 is not allowed" in err
    assert not (tmp_path / "out").exists()


def test_analyze_without_matplotlib_names_the_plot_extra(model_folder, tmp_path, capsys, monkeypatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit, match=r"hf-moe\[plot\].*--no-plots"):
        main(["analyze", str(model_folder / "model"), "--data", str(model_folder / "code.txt")])
    out = tmp_path / "tables"
    assert main(["analyze", str(model_folder / "model"), "--data", str(model_folder / "code.txt"), "--no-plots",
                 "--max-tokens", "64", "--seq-len", "32", "--output", str(out)]) == 0
    assert (out / "report.md").is_file() and not list(out.glob("*.png"))
