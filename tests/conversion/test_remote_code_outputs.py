"""Folders written by `hf_moe.convert` (other family -> hf_moe) and `hf_moe.upcycle` carry hf_moe's modeling code and
`auto_map`, like `save_pretrained`'s: they load with stock transformers and `trust_remote_code=True` in a process that
never imports hf_moe, with hf_moe's own logits. Exports to other families never carry it; `remote_code=False` and
`--no-remote-code` leave it out."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import hf_moe
from hf_moe.cli import main as cli_main
from hf_moe.hub import AUTO_MAP, remote_code_files
from hf_moe.modeling.model import MoEForCausalLM
from tests.conftest import tiny_config
from tests.conversion.families.oracle import cases, dense_checkpoint, family_model
from tests.test_remote_code import hf_moe_logits, load_without_hf_moe

CODE = sorted(f.name for f in remote_code_files())
UPCYCLE = dict(num_experts=4, top_k=2, probe=False, progress=False)


def code_in(folder: Path) -> tuple[list[str], object]:
    """The .py files of `folder` and its config.json's auto_map (None when absent)."""
    return sorted(p.name for p in folder.glob("*.py")), json.loads((folder / "config.json").read_text()).get("auto_map")


def test_converted_and_upcycled_folders_load_without_hf_moe(tmp_path: Path) -> None:
    theirs, _ = family_model(cases()["deepseek_v3_qlora_yarn"])
    theirs.save_pretrained(tmp_path / "v3")
    dense_checkpoint(tmp_path / "llama", cases()["llama"])
    report = hf_moe.convert(tmp_path / "v3", tmp_path / "converted", progress=False)
    upcycled = hf_moe.upcycle(tmp_path / "llama", tmp_path / "upcycled", **UPCYCLE)
    assert report.remote_code and "remote code" in str(report) and upcycled.extra["remote_code"]
    folders = [tmp_path / "converted", tmp_path / "upcycled"]
    for folder in folders:
        assert code_in(folder) == (CODE, AUTO_MAP)
        assert all((folder / name).read_bytes() == (Path(hf_moe.modeling.__file__).parent / name).read_bytes()
                   for name in CODE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "llama", "upcycled", "v3"]  # no leftovers

    for folder, (loaded, logits) in zip(folders, load_without_hf_moe(folders, tmp_path)):
        assert torch.equal(logits, hf_moe_logits(folder, loaded["backends"])), folder.name


def test_exports_never_carry_hf_moe_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_config(attention_type="gqa", num_key_value_heads=2, head_dim=8, q_lora_rank=None, n_shared_experts=0,
                         first_k_dense_replace=0, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                         routed_scaling_factor=1.0, norm_topk_prob=True)  # Mixtral-expressible
    MoEForCausalLM(config).save_pretrained(tmp_path / "moe")  # carries the code + auto_map itself
    assert code_in(tmp_path / "moe") == (CODE, AUTO_MAP)
    report = hf_moe.convert(tmp_path / "moe", tmp_path / "mixtral", to="mixtral", progress=False)
    again = hf_moe.convert(tmp_path / "mixtral", tmp_path / "mixtral2", to="mixtral", progress=False)  # via hf_moe
    for folder, written in ((tmp_path / "mixtral", report), (tmp_path / "mixtral2", again)):
        assert code_in(folder) == ([], None) and not written.remote_code
        assert type(AutoModelForCausalLM.from_pretrained(folder)) is MixtralForCausalLM


def test_remote_code_false_and_the_cli_opt_out(tmp_path: Path) -> None:
    theirs, _ = family_model(cases()["mixtral"])
    theirs.save_pretrained(tmp_path / "mixtral")
    dense_checkpoint(tmp_path / "llama", cases()["llama"])
    hf_moe.convert(tmp_path / "mixtral", tmp_path / "converted", progress=False, remote_code=False)
    hf_moe.upcycle(tmp_path / "llama", tmp_path / "upcycled", remote_code=False, **UPCYCLE)
    assert cli_main(["convert", str(tmp_path / "mixtral"), str(tmp_path / "cli-converted"), "--no-remote-code"]) == 0
    assert cli_main(["upcycle", str(tmp_path / "llama"), str(tmp_path / "cli-upcycled"), "--experts", "4",
                     "--top-k", "2", "--no-probe", "--no-remote-code"]) == 0
    for name in ("converted", "upcycled", "cli-converted", "cli-upcycled"):
        assert code_in(tmp_path / name) == ([], None), name
        assert type(AutoModelForCausalLM.from_pretrained(tmp_path / name)) is MoEForCausalLM
    assert cli_main(["convert", str(tmp_path / "mixtral"), str(tmp_path / "cli-default")]) == 0
    assert code_in(tmp_path / "cli-default") == (CODE, AUTO_MAP)
