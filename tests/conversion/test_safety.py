"""Faults during conversion and upcycling: real kills (SIGKILL, SIGTERM) mid-write, a full disk, outputs that
overlap their source, index entries and symlinks leading out of the checkpoint, damaged files. Nothing is lost,
nothing half-written stays, nothing outside the named folders is read, and every error names the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_moe
from hf_moe import MoEForCausalLM
from hf_moe.cli import main as cli_main
from hf_moe.conversion import checkpoint_io
from hf_moe.conversion.checkpoint_io import SAFE_WEIGHTS_INDEX_NAME, CheckpointError, SourceCheckpoint
from hf_moe.files import OverlappingFoldersError, UnsafePathError
from tests.conftest import tiny_config
from tests.test_cli import error_line

UPCYCLE = dict(num_experts=4, top_k=2, probe=False, progress=False, max_shard_size="20KB")
CLI_UPCYCLE = ["--experts", "4", "--top-k", "2", "--no-probe", "--max-shard-size", "20KB"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved in several shards with an index (what the faults below need)."""
    folder = tmp_path_factory.mktemp("dense") / "dense"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="20KB")
    assert (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()
    return folder


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("moe") / "moe"
    MoEForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="40KB")
    return folder


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, symlinks=True)
    return to


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, hidden ones included (relative name -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------- real kills
KILLABLE = r"""
import sys, time
from pathlib import Path
from hf_moe.conversion import checkpoint_io

real, count = checkpoint_io.save_file, [0]

def paused(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    count[0] += 1
    if count[0] == 2:  # two shards are on disk: tell the test, then wait to be killed
        Path(sys.argv[1]).write_text("paused")
        time.sleep(120)

checkpoint_io.save_file = paused
from hf_moe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_until_paused(flag: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(flag), *args], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the conversion never reached its second shard"
        time.sleep(0.05)
    return process


def test_sigkill_mid_upcycle_keeps_the_old_output_and_the_rerun_tidies(dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "moe"
    assert cli_main(["upcycle", str(dense_dir), str(out), *CLI_UPCYCLE]) == 0
    before = tree(out)
    process = run_until_paused(tmp_path / "flag", ["upcycle", str(dense_dir), str(out), *CLI_UPCYCLE, "--overwrite"])
    assert len(hidden(tmp_path)) == 1 and hidden(tmp_path)[0].startswith(".moe.tmp-")  # it was really writing
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert tree(out) == before and len(hidden(tmp_path)) == 1  # old output untouched; nobody could clean up

    assert cli_main(["upcycle", str(dense_dir), str(out), *CLI_UPCYCLE, "--overwrite"]) == 0  # the rerun tidies
    assert hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["flag", "moe"]
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "MoEForCausalLM"


def test_sigterm_mid_upcycle_cleans_up_like_ctrl_c(dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "moe"
    process = run_until_paused(tmp_path / "flag", ["upcycle", str(dense_dir), str(out), *CLI_UPCYCLE])
    assert len(hidden(tmp_path)) == 1
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "hf-moe: terminated" in stderr and "Traceback" not in stderr
    assert not out.exists() and hidden(tmp_path) == []  # the temporary folder went at once


# ---------------------------------------------------------------------------------------------- disk full
def disk_full_after(monkeypatch: pytest.MonkeyPatch, shards: int, keep_bytes: int = 1000) -> None:
    """safetensors' writer runs out of space in shard number `shards`: a partial file, then ENOSPC."""
    real, count = checkpoint_io.save_file, [0]

    def full(tensors: dict, filename: Path, metadata: dict | None = None) -> None:
        count[0] += 1
        real(tensors, filename, metadata=metadata)
        if count[0] == shards:
            with open(filename, "r+b") as handle:
                handle.truncate(keep_bytes)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(checkpoint_io, "save_file", full)


def test_disk_full_during_upcycle_and_convert_keeps_the_old_outputs(
    dense_dir: Path, moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    hf_moe.upcycle(dense_dir, tmp_path / "up", **UPCYCLE)
    hf_moe.convert(moe_dir, tmp_path / "conv", to="deepseek_v3", progress=False, max_shard_size="40KB")
    before = tree(tmp_path)
    disk_full_after(monkeypatch, shards=2)
    with pytest.raises(OSError, match="No space left"):
        hf_moe.upcycle(dense_dir, tmp_path / "up", overwrite=True, **UPCYCLE)
    disk_full_after(monkeypatch, shards=1)  # the CLI's default shard size: one shard
    assert cli_main(["convert", str(moe_dir), str(tmp_path / "conv"), "--to", "deepseek_v3", "--overwrite"]) == 2
    assert error_line(capsys).startswith("hf-moe: error: convert: No space left on device: ")
    assert tree(tmp_path) == before  # both old outputs byte-identical, no partial or hidden files


# ------------------------------------------------------------------------------------- overlapping folders
def test_an_output_containing_the_source_is_refused_before_anything_is_deleted(
    dense_dir: Path, moe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"
    src = copy_of(dense_dir, work / "models" / "dense")
    moe = copy_of(moe_dir, work / "models" / "moe")
    (work / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(src)
    (tmp_path / "link-moe").symlink_to(moe)
    before = tree(tmp_path)
    for out in (work / "models", work, tmp_path / "link"):
        with pytest.raises(OverlappingFoldersError, match=r"contains the source folder|is the source folder") as err:
            hf_moe.upcycle(src, out, overwrite=True, **UPCYCLE)
        assert str(src) in str(err.value) and str(out) in str(err.value)
    for out in (work / "models", work, tmp_path / "link-moe"):
        with pytest.raises(OverlappingFoldersError, match=r"contains the source folder|is the source folder"):
            hf_moe.convert(moe, out, to="deepseek_v3", overwrite=True, progress=False)
    with pytest.raises(OverlappingFoldersError, match="is inside the source folder"):
        hf_moe.upcycle(src, src / "moe", **UPCYCLE)
    assert cli_main(["upcycle", str(src), str(work), *CLI_UPCYCLE, "--overwrite"]) == 2
    err = error_line(capsys)
    assert str(work) in err and str(src) in err and "contains the source" in err
    assert tree(tmp_path) == before


# -------------------------------------------------------------------------------------------- path escapes
def crafted_index(dense_dir: Path, tmp_path: Path, entry: str) -> tuple[Path, str]:
    """A copy of the checkpoint whose index sends one tensor's shard to `entry` (a copy of the real shard is put
    where the entry points, so that following it would succeed)."""
    src = copy_of(dense_dir, tmp_path / "src")
    index = json.loads((src / SAFE_WEIGHTS_INDEX_NAME).read_text())
    key = sorted(index["weight_map"])[0]
    shard = src / index["weight_map"][key]
    target = Path(entry) if Path(entry).is_absolute() else src / entry
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shard, target)
    index["weight_map"][key] = entry
    (src / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    return src, key


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_checkpoint_are_refused(entry: str, dense_dir: Path, tmp_path: Path) -> None:
    entry = str(tmp_path / "elsewhere" / "x.safetensors") if entry == "ABS" else entry
    src, key = crafted_index(dense_dir, tmp_path, entry)
    for run in (lambda: hf_moe.upcycle(src, tmp_path / "out", **UPCYCLE), lambda: SourceCheckpoint(src)):
        with pytest.raises(UnsafePathError, match="points outside the folder") as caught:
            run()
        assert f"{src / SAFE_WEIGHTS_INDEX_NAME} entry {key!r}" in str(caught.value) and entry in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_shard_symlinked_out_of_the_checkpoint_is_refused(dense_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    src = copy_of(dense_dir, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    assert cli_main(["upcycle", str(src), str(tmp_path / "out"), *CLI_UPCYCLE]) == 2
    err = error_line(capsys)
    assert "is a symlink to" in err and shard.name in err and SAFE_WEIGHTS_INDEX_NAME in err
    assert not (tmp_path / "out").exists()


def test_a_hub_cache_snapshot_of_symlinks_into_blobs_converts(dense_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--dense"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for file in dense_dir.iterdir():
        shutil.copy(file, repo / "blobs" / f"blob-{file.name}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob-{file.name}")
    report = hf_moe.upcycle(snapshot, tmp_path / "out", **UPCYCLE)
    assert report.base_model == "org/dense" and (tmp_path / "out" / "generation_config.json").is_file()


def test_side_files_symlinked_out_of_the_source_are_not_copied(dense_dir: Path, moe_dir: Path, tmp_path: Path
                                                               ) -> None:  # fmt: skip
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    for name, folder, run in (
        ("dense", dense_dir, lambda s, o: hf_moe.upcycle(s, o, **UPCYCLE)),
        ("moe", moe_dir, lambda s, o: hf_moe.convert(s, o, to="deepseek_v3", progress=False)),
    ):
        src = copy_of(folder, tmp_path / f"{name}-src")
        (src / "tokenizer.json").symlink_to(tmp_path / "id_rsa")
        (src / "vocab.json").symlink_to("/etc/hostname")
        (src / "tokenizer_config.json").write_text("{}")
        run(src, tmp_path / f"{name}-out")
        copied = {p.name for p in (tmp_path / f"{name}-out").iterdir()}
        assert "tokenizer_config.json" in copied and not {"tokenizer.json", "vocab.json"} & copied
        for file in (tmp_path / f"{name}-out").iterdir():
            assert b"PRIVATE KEY" not in file.read_bytes()


# ------------------------------------------------------------------------------------------- damaged files
def test_damaged_files_are_named(dense_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shard = sorted(p.name for p in dense_dir.glob("model-*.safetensors"))[1]
    cases = {
        "truncated": (shard, lambda b: b[: len(b) // 2], rf"{shard} is not a readable safetensors file"),
        "header": (shard, lambda b: b"\xff" * 64, rf"{shard} is not a readable safetensors file"),
        "config": ("config.json", lambda b: b"{not json", r"config.json is not valid JSON: .* line 1"),
        "index": (SAFE_WEIGHTS_INDEX_NAME, lambda b: b'{"weight_map": [', rf"{SAFE_WEIGHTS_INDEX_NAME} is not valid JSON"),
        "index-list": (SAFE_WEIGHTS_INDEX_NAME, lambda b: b"[1, 2]", rf"{SAFE_WEIGHTS_INDEX_NAME} must hold an object"),
    }  # fmt: skip
    for name, (file, damage, message) in cases.items():
        src = copy_of(dense_dir, tmp_path / name)
        (src / file).write_bytes(damage((src / file).read_bytes()))
        with pytest.raises(ValueError, match=message):
            hf_moe.upcycle(src, tmp_path / f"{name}-out", **UPCYCLE)
        assert cli_main(["upcycle", str(src), str(tmp_path / f"{name}-out"), *CLI_UPCYCLE]) == 2
        err = error_line(capsys)
        assert str(src / file) in err, err
        assert not (tmp_path / f"{name}-out").exists() and hidden(tmp_path) == []


def test_a_shard_whose_data_is_cut_short_is_named(tmp_path: Path) -> None:
    """A shard whose header is whole but whose data is short: named when the shard is opened."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.zeros(64), "b": torch.ones(64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        with SourceCheckpoint(tmp_path) as source:
            source.get("b")


def test_probe_texts_without_a_tokenizer_say_so(dense_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no tokenizer files \(tokenizer.json, ") as caught:
        hf_moe.upcycle(dense_dir, tmp_path / "out", num_experts=4, top_k=2, probe_texts=["hello"], progress=False)
    assert "sentencepiece" not in str(caught.value)
