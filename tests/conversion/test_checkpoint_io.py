"""Streaming checkpoint IO: size-capped shards with an index, lazy reading, atomic output folders, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_moe
from hf_moe.conversion import checkpoint_io
from hf_moe.conversion.checkpoint_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    ShardedWriter,
    SourceCheckpoint,
    atomic_output_dir,
    parse_size,
    rewrite_checkpoint,
)


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(folder, max_shard_size)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    index = writer.finish()
    (folder / "config.json").write_text(json.dumps({"model_type": "test"}))
    return index


def tensors_of(n: int = 6, numel: int = 256) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(numel, generator=generator) for i in range(n)}  # 1 KiB each


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(123) == 123 and parse_size("4096") == 4096
    for bad in ("-1GB", "two GB", "5XB", 0):
        with pytest.raises(ValueError, match="max_shard_size="):
            parse_size(bad)


def test_writer_splits_by_size_and_round_trips(tmp_path: Path) -> None:
    tensors = tensors_of()
    index = write_tensors(tmp_path, tensors, max_shard_size=2500)  # two 1024-byte tensors per shard
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    on_disk = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert on_disk == index and on_disk["metadata"]["total_size"] == 6 * 1024
    assert on_disk["weight_map"]["t0"] == files[0] and on_disk["weight_map"]["t5"] == files[2]
    assert not list(tmp_path.glob("*.partial"))
    with SourceCheckpoint(tmp_path) as source:
        assert sorted(source.keys()) == sorted(tensors) and source.shape("t3") == (256,)
        assert source.dtype("t3") == torch.float32 and source.total_bytes() == 6 * 1024
        streamed = list(source.iter_tensors(progress=False))
        assert [k for k, _ in streamed] == [f"t{i}" for i in range(6)]  # shard by shard, in order
        for key, tensor in streamed:
            assert torch.equal(tensor, tensors[key])


def test_single_shard_is_model_safetensors_and_big_tensors_stand_alone(tmp_path: Path) -> None:
    write_tensors(tmp_path / "one", tensors_of(2), max_shard_size="1MB")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == [SAFE_WEIGHTS_NAME]
    assert not (tmp_path / "one" / SAFE_WEIGHTS_INDEX_NAME).exists()
    writer = ShardedWriter(tmp_path, max_shard_size=100)  # every tensor is larger than the cap
    for key, tensor in tensors_of(3).items():
        writer.add(key, tensor)
    writer.finish()
    assert writer.largest_shard == 1024 and len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3


def test_writer_accepts_views_and_tied_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).view(3, 4)
    writer = ShardedWriter(tmp_path, "1MB")
    writer.add("row", base[1])  # a view of a larger storage
    writer.add("col", base[:, 1])  # non-contiguous
    writer.add("a", base)
    writer.add("b", base)  # the same tensor twice (tied weights)
    with pytest.raises(ValueError, match="'a' was written twice"):
        writer.add("a", base)
    writer.finish()
    loaded = load_file(tmp_path / SAFE_WEIGHTS_NAME)
    assert torch.equal(loaded["row"], base[1]) and torch.equal(loaded["col"], base[:, 1])
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["b"], base)


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a folder"):
        SourceCheckpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        SourceCheckpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*pytorch_model.bin.*save_pretrained"):
        SourceCheckpoint(tmp_path / "empty")
    write_tensors(tmp_path / "sharded", tensors_of(), max_shard_size=2500)
    (tmp_path / "sharded" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing 1 of its 3 weight shards.*model-00002-of-00003"):
        SourceCheckpoint(tmp_path / "sharded")
    write_tensors(tmp_path / "ok", tensors_of(1), max_shard_size="1MB")
    with SourceCheckpoint(tmp_path / "ok") as source, pytest.raises(CheckpointError, match="no tensor 'x'"):
        source.get("x")


def test_atomic_output_commits_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    with pytest.raises(FileExistsError, match="not empty: pass overwrite=True"):
        with atomic_output_dir(out):
            pass
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "a.txt").write_text("half")
                raise error
        assert (out / "a.txt").read_text() == "new"  # the old output survives a failed overwrite
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup folders left
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty") as tmp:  # an existing empty folder is fine
        (tmp / "c.txt").write_text("x")
    assert (tmp_path / "empty" / "c.txt").exists()
    with pytest.raises(FileExistsError, match="is the source folder"):
        checkpoint_io.check_output_dir(out, overwrite=True, src=out)


def test_rewrite_checkpoint_streams_and_copies_side_files(tmp_path: Path) -> None:
    tensors = tensors_of()
    write_tensors(tmp_path / "src", tensors, max_shard_size=2500)
    (tmp_path / "src" / "generation_config.json").write_text('{"do_sample": false}')
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    held: list[tuple[str, torch.Tensor]] = []

    def transform(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key == "t1":  # hold one tensor back until the end
            held.append((key, tensor))
            return []
        return [(f"new.{key}", tensor.half())]

    index = rewrite_checkpoint(tmp_path / "src", tmp_path / "out", transform,
                               lambda folder: (folder / "config.json").write_text("{}"),
                               finalize=lambda: [(f"late.{k}", t) for k, t in held], max_shard_size=1500,
                               progress=False)  # fmt: skip
    assert set(index["weight_map"]) == {f"new.t{i}" for i in (0, 2, 3, 4, 5)} | {"late.t1"}
    assert (tmp_path / "out" / "generation_config.json").read_text() == '{"do_sample": false}'
    with SourceCheckpoint(tmp_path / "out") as out:
        assert out.dtype("new.t0") == torch.float16 and torch.equal(out.get("late.t1"), tensors["t1"])


def test_interrupted_upcycle_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while the second shard is written: no output folder, no temporary folder left behind;
    with overwrite=True an existing output is left untouched."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    real_save, calls = checkpoint_io.save_file, []

    def failing_save(tensors: dict, filename: Path, metadata: dict | None = None) -> None:
        calls.append(filename)
        if len(calls) == 2:
            real_save(tensors, filename, metadata=metadata)  # a partial file exists when the failure hits
            raise OSError("disk full (injected)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    kwargs = dict(num_experts=4, top_k=2, max_shard_size="20KB", probe=False, progress=False)
    with pytest.raises(OSError, match="injected"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", **kwargs)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]

    monkeypatch.setattr(checkpoint_io, "save_file", real_save)
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", **kwargs)
    shards = sorted(p.name for p in (tmp_path / "moe").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "moe" / SAFE_WEIGHTS_INDEX_NAME).is_file()
    with SourceCheckpoint(tmp_path / "moe") as out:
        for shard in shards:  # each shard fits the cap unless it holds one tensor larger than the cap
            keys = [k for k, f in out.weight_map.items() if f == shard]
            assert len(keys) == 1 or sum(out.nbytes(k) for k in keys) <= 20_000
    assert report.bytes_written == sum((tmp_path / "moe" / s).stat().st_size for s in shards) - sum(
        _header_bytes(tmp_path / "moe" / s) for s in shards)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "moe")).__name__ == "MoEForCausalLM"

    calls.clear()
    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", overwrite=True, **kwargs)
    assert sorted(p.name for p in (tmp_path / "moe").glob("*.safetensors")) == shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]


def _header_bytes(path: Path) -> int:
    """Bytes of a safetensors file that are not tensor data (8-byte length + JSON header)."""
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--overwrite"):
        hf_moe.upcycle(tmp_path / "does-not-matter", tmp_path / "out", num_experts=2, top_k=1, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
