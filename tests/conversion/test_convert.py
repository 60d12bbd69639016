"""`hf_moe.convert`, folder to folder: each family -> hf_moe (same logits as transformers' own class) -> back
(identical tensors, loads in transformers with the same logits); DeepSeek-V3's on-disk MTP layers; atomic
output when interrupted; clear errors for bad inputs.

Sources are written by transformers' `save_pretrained` (the per-expert "original" layout in transformers 5)
or by hand from `state_dict()` (the fused "transformers" layout); tiny configs: the families' oracle cases.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.cli import main as cli_main
from hf_moe.conversion import checkpoint_io
from hf_moe.conversion.checkpoint_io import SAFE_WEIGHTS_INDEX_NAME, CheckpointError
from hf_moe.conversion.records import MoEFamily
from hf_moe.modeling.model import MoEForCausalLM
from tests.conversion.families.oracle import cases, family_model, inputs, logits_of
from tests.conversion.families.test_deepseek_v3 import mtp_case

TOL = 1e-5
CASES = cases(MoEFamily)
LOAD = dict(attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, across its shards."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def save_source(model: torch.nn.Module, folder: Path, layout: str, max_shard_size: str | None = None) -> None:
    """Layout "original": transformers' save_pretrained; "transformers": its fused state_dict() by hand."""
    if layout == "original":
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return
    model.config.save_pretrained(folder)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# oracle case (tests/conversion/families), source layout, max_shard_size of the source and of the converted folders
ROUND_TRIPS = [
    ("deepseek_v3_qlora_yarn", "original", None),
    ("deepseek_v2_group_limited", "transformers", None),
    ("mixtral", "original", "150KB"),
    ("qwen2_moe", "original", None),
    ("qwen3_moe", "transformers", None),  # tied head, written once more as lm_head.weight
    ("olmoe", "original", None),
]


@pytest.mark.parametrize(("case", "layout", "shard"), ROUND_TRIPS, ids=[c for c, _, _ in ROUND_TRIPS])
def test_family_to_hf_moe_and_back(case: str, layout: str, shard: str | None, tmp_path: Path) -> None:
    theirs, config = family_model(CASES[case])
    family = config.model_type
    src, moe, back = tmp_path / "src", tmp_path / "moe", tmp_path / "back"
    save_source(theirs, src, layout, shard)
    input_ids, mask = inputs(CASES[case][2])
    expected = logits_of(theirs, input_ids, mask)
    shards = {"max_shard_size": shard} if shard else {}

    report = hf_moe.convert(src, moe, progress=False, **shards)
    assert (report.family_in, report.family_out, report.layout) == (family, "hf_moe", None)
    assert f"({family}) -> {moe} (hf_moe)" in str(report)
    ours = AutoModelForCausalLM.from_pretrained(moe, **LOAD).eval()
    assert isinstance(ours, MoEForCausalLM)
    diff = (logits_of(ours, input_ids, mask) - expected)[mask.bool()].abs().max().item()
    assert diff < TOL, f"{case}: max |logits diff| = {diff:.3g}"

    report = hf_moe.convert(moe, back, to=family, layout=layout, progress=False, **shards)
    assert report.tensors_out == len(folder_tensors(back))
    original, exported = folder_tensors(src), folder_tensors(back)
    if config.tie_word_embeddings:
        original.pop("lm_head.weight", None)  # on disk a tied head is left out
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    reloaded = AutoModelForCausalLM.from_pretrained(back, **LOAD).eval()
    assert type(reloaded) is type(theirs)
    torch.testing.assert_close(logits_of(reloaded, input_ids, mask), expected, rtol=0, atol=TOL)
    if shard:
        assert (src / SAFE_WEIGHTS_INDEX_NAME).is_file() and len(list(src.glob("*.safetensors"))) > 1
        assert report.shards > 1 and (back / SAFE_WEIGHTS_INDEX_NAME).is_file()
        assert len(list(moe.glob("*.safetensors"))) > 1


def test_deepseek_v3_mtp_layers_on_disk(tmp_path: Path) -> None:
    _, config, disk = mtp_case()  # layer N = num_hidden_layers holds the MTP module, as released checkpoints do
    n = config.num_hidden_layers
    src, moe, back = tmp_path / "src", tmp_path / "moe", tmp_path / "back"
    config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in disk.items()}, src / "model.safetensors", metadata={"format": "pt"})

    hf_moe.convert(src, moe, progress=False)
    ours = AutoModelForCausalLM.from_pretrained(moe, **LOAD)
    assert ours.config.num_nextn_predict_layers == 1
    mtp = ours.mtp[0]
    pairs = [
        (mtp.enorm.weight, "enorm.weight"), (mtp.hnorm.weight, "hnorm.weight"), (mtp.eh_proj.weight, "eh_proj.weight"),
        (mtp.norm.weight, "shared_head.norm.weight"), (mtp.block.self_attn.o_proj.weight, "self_attn.o_proj.weight"),
        (mtp.block.mlp.gate.e_score_correction_bias, "mlp.gate.e_score_correction_bias"),
    ]  # fmt: skip
    for tensor, key in pairs:
        assert torch.equal(tensor, disk[f"model.layers.{n}.{key}"]), key
    for e in range(config.n_routed_experts):
        gate, up = mtp.block.mlp.experts.gate_up_proj[e].chunk(2, dim=0)
        assert torch.equal(gate, disk[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(up, disk[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"])

    hf_moe.convert(moe, back, to="deepseek_v3", progress=False)
    exported = folder_tensors(back)
    assert exported.keys() == disk.keys()
    assert all(torch.equal(exported[k], disk[k]) for k in disk)
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == 1

    # transformers' default config promises one MTP module its own save never writes: converted without it
    no_mtp = tmp_path / "no_mtp"
    config.save_pretrained(no_mtp)
    save_file({k: v.contiguous() for k, v in disk.items() if not k.startswith(f"model.layers.{n}.")},
              no_mtp / "model.safetensors")  # fmt: skip
    report = hf_moe.convert(no_mtp, tmp_path / "no_mtp_moe", progress=False)
    assert "num_nextn_predict_layers=0" in str(report)
    assert hf_moe.MoEConfig.from_pretrained(tmp_path / "no_mtp_moe").num_nextn_predict_layers == 0


@pytest.fixture(scope="module")
def mixtral_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A sharded Mixtral folder (per-expert keys) with a tokenizer file beside it."""
    theirs, _ = family_model(CASES["mixtral"])
    src = tmp_path_factory.mktemp("mixtral") / "src"
    theirs.save_pretrained(src, max_shard_size="150KB")
    (src / "tokenizer_config.json").write_text("{}")
    return theirs, src


def test_same_family_relayout_cli_and_refusals(mixtral_src: tuple[torch.nn.Module, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    theirs, src = mixtral_src
    report = hf_moe.convert(src, tmp_path / "fused", to="mixtral", layout="transformers", progress=False)
    fused = folder_tensors(tmp_path / "fused")
    assert fused.keys() == theirs.state_dict().keys()
    assert all(torch.equal(fused[k], v) for k, v in theirs.state_dict().items())
    assert "through hf_moe" in str(report) and report.side_files == ["generation_config.json", "tokenizer_config.json"]
    assert (tmp_path / "fused" / "tokenizer_config.json").is_file()

    assert cli_main(["convert", str(src), str(tmp_path / "cli")]) == 0
    assert "(mixtral) -> " in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "cli"), str(tmp_path / "cli2")]) == 2  # hf_moe source, no --to
    assert "--to FAMILY" in capsys.readouterr().err

    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # trained balancing bias: mixtral has none
    trained = folder_tensors(tmp_path / "cli")
    trained[bias] = torch.full_like(trained[bias], 0.01)
    save_file(trained, tmp_path / "cli" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"non-zero router balancing biases.*: {bias}"):
        hf_moe.convert(tmp_path / "cli", tmp_path / "x", to="mixtral", progress=False)
    with pytest.raises(ValueError, match="Cannot export to qwen3_moe: MoEConfig.qk_norm"):
        hf_moe.convert(src, tmp_path / "qwen3", to="qwen3_moe", progress=False)
    with pytest.raises(ValueError, match="to='llama' is not supported"):
        hf_moe.convert(src, tmp_path / "llama", to="llama", progress=False)
    with pytest.raises(ValueError, match="layout="):
        hf_moe.convert(tmp_path / "cli", tmp_path / "x", to="mixtral", layout="fused", progress=False)
    assert leftovers(tmp_path) == ["cli", "fused"]


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_no_output(interrupt: type[BaseException], mixtral_src: tuple[torch.nn.Module, Path],
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _, src = mixtral_src
    out = tmp_path / "out"
    if interrupt is KeyboardInterrupt:  # an existing output (overwrite=True) survives untouched
        out.mkdir()
        (out / "keep.txt").write_text("old")
    real_save, calls = checkpoint_io.save_file, []

    def failing_save(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:  # the first shard is on disk; the second one fails mid-write
            raise interrupt("injected")
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    with pytest.raises(interrupt, match="injected"):
        hf_moe.convert(src, out, max_shard_size="100KB", overwrite=True, progress=False)
    if interrupt is KeyboardInterrupt:
        assert leftovers(tmp_path) == ["out"] and leftovers(out) == ["keep.txt"]
    else:
        assert leftovers(tmp_path) == []


def test_bad_inputs_give_clear_errors(mixtral_src: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, good = mixtral_src

    def source(name: str, edit: Callable[[dict[str, torch.Tensor]], object] | None = None) -> Path:
        """A copy of the good source; with `edit`, its tensors edited and written as one file."""
        folder = tmp_path / name
        if edit is None:
            shutil.copytree(good, folder)
            return folder
        folder.mkdir()
        shutil.copy(good / "config.json", folder)
        tensors = folder_tensors(good)
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    unknown = source("unknown")
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"unknown architecture model_type='gpt2'.*'deepseek_v3'"):
        hf_moe.convert(unknown, tmp_path / "out", progress=False)

    missing_shard = source("missing_shard")
    shards = sorted(p.name for p in missing_shard.glob("*.safetensors"))
    (missing_shard / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"missing 1 of its {len(shards)} weight shards.*{shards[1]}"):
        hf_moe.convert(missing_shard, tmp_path / "out", progress=False)

    key = "model.layers.1.self_attn.q_proj.weight"
    shape = source("shape", lambda t: t.update({key: torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(32, 64\), expected \(64, 64\)"):
        hf_moe.convert(shape, tmp_path / "out", progress=False)

    expert = "model.layers.2.block_sparse_moe.experts.3.w3.weight"

    def edit_keys(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["model.norm.weight"], tensors[expert]
        tensors["model.layers.0.extra.weight"] = torch.ones(2)

    with pytest.raises(CheckpointError) as error:
        hf_moe.convert(source("keys", edit_keys), tmp_path / "out", progress=False)
    message = str(error.value)
    assert "unexpected keys" in message and "model.layers.0.extra.weight" in message
    assert "missing keys" in message and "model.norm.weight" in message
    assert "incomplete per-expert groups" in message and expert in message
    assert leftovers(tmp_path) == ["keys", "missing_shard", "shape", "unknown"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_moe.convert(good, out, progress=False)
    hf_moe.convert(good, out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
