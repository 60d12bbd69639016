"""hf_moe.files: names stay inside their folder, outputs never overlap their source, output folders and files are
replaced with rollback, leftovers of killed runs are tidied, SIGTERM runs the same cleanup as Ctrl-C."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_moe import files
from hf_moe.files import (
    BadFileError,
    OverlappingFoldersError,
    Terminated,
    UnsafePathError,
    atomic_files,
    atomic_output_dir,
    check_disjoint,
    clean_stale,
    copy_inside,
    read_json,
    resolve_inside,
    terminate_as_interrupt,
)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative name -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ paths
def test_resolve_inside_refuses_names_leading_out(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (folder / "out-link").symlink_to(tmp_path / "secret")
    (folder / "in-link").symlink_to(folder / "sub")
    assert resolve_inside(folder, "sub/a.safetensors") == folder / "sub" / "a.safetensors"
    assert resolve_inside(folder, "in-link/a.safetensors") == folder / "in-link" / "a.safetensors"
    where = "model.safetensors.index.json entry 'w'"
    for name in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/hostname", "out-link", "", "a\x00"):
        with pytest.raises(UnsafePathError, match="entry 'w'") as caught:
            resolve_inside(folder, name, source=where)
        assert repr(name) in str(caught.value) or str(folder) in str(caught.value)


def test_resolve_inside_accepts_a_hub_cache_snapshot(tmp_path: Path) -> None:
    """Hub cache snapshots are symlinks into the repository's blobs/: those are the checkpoint's own files."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"weights")
    snapshot = repo / "snapshots" / "rev0"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc123")
    (snapshot / "other").symlink_to(tmp_path)  # still refused: outside blobs/
    assert resolve_inside(snapshot, "model.safetensors").resolve() == repo / "blobs" / "abc123"
    with pytest.raises(UnsafePathError, match="outside the folder"):
        resolve_inside(snapshot, "other")


SEGMENTS = st.sampled_from(["a", "b", "..", ".", "in", "out", "c.safetensors"])


@settings(max_examples=150, deadline=None)
@given(st.lists(SEGMENTS, min_size=1, max_size=5), st.booleans())
def test_resolve_inside_never_returns_a_path_outside(segments: list[str], absolute: bool) -> None:
    """Property: whatever the name, resolve_inside either refuses it or returns a path that really lies in the
    folder (symlinks followed): here "in" links inside, "out" links outside the folder."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "ckpt"
        (folder / "a").mkdir(parents=True)
        (folder / "in").symlink_to(folder / "a")
        (folder / "out").symlink_to(Path(root))
        name = ("/" if absolute else "") + "/".join(segments)
        try:
            path = resolve_inside(folder, name)
        except UnsafePathError:
            return
        real = path.resolve()
        assert real == folder.resolve() or folder.resolve() in real.parents, (name, real)


def test_check_disjoint_names_both_folders(tmp_path: Path) -> None:
    src = tmp_path / "work" / "src"
    src.mkdir(parents=True)
    (tmp_path / "link").symlink_to(src)
    cases = {tmp_path / "work": "contains the source folder", tmp_path: "contains the source folder",
             src: "is the source folder", tmp_path / "link": "is the source folder",
             src / "out": "is inside the source folder"}  # fmt: skip
    for out, what in cases.items():
        with pytest.raises(OverlappingFoldersError, match=what) as caught:
            check_disjoint(src, out)
        assert str(src) in str(caught.value) and str(out) in str(caught.value)
        assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, ValueError)
    check_disjoint(src, tmp_path / "work" / "src2")  # a common prefix is not containment
    check_disjoint(src, tmp_path / "work" / "out")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("ab"), max_size=3), st.lists(st.sampled_from("ab"), max_size=3))
def test_check_disjoint_refuses_exactly_ancestors_and_descendants(a: list[str], b: list[str]) -> None:
    root = Path(tempfile.gettempdir()) / "hf-moe-disjoint"
    src, out = root.joinpath(*a), root.joinpath(*b)
    overlap = a == b[: len(a)] or b == a[: len(b)]
    try:
        check_disjoint(src, out)
    except OverlappingFoldersError:
        assert overlap
    else:
        assert not overlap


def test_read_json_names_the_file_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    for content, what in ((b"{not json", r"config.json is not valid JSON: .* line 1, column 2"),
                          (b"\xff\xfe\x00binary", r"config.json is not UTF-8 text"),
                          (b"[1, 2]", r"config.json must hold an object .* holds list")):  # fmt: skip
        path.write_bytes(content)
        with pytest.raises(BadFileError, match=what):
            read_json(path)
    path.write_text('{"a": 1}')
    assert read_json(path) == {"a": 1}


def test_copy_inside_copies_regular_files_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (tmp_path / "id_rsa").write_text("PRIVATE")
    (src / "tokenizer.json").write_text("{}")
    (src / "vocab.json").symlink_to(tmp_path / "id_rsa")
    (src / "merges.txt").symlink_to(src / "tokenizer.json")  # inside: copied (as content)
    (src / "vocab.txt").mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_moe.files"):
        copied = copy_inside(src, dst, ["tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "absent.json"])
    assert copied == ["tokenizer.json", "merges.txt"]
    assert sorted(p.name for p in dst.iterdir()) == ["merges.txt", "tokenizer.json"]
    assert not (dst / "merges.txt").is_symlink()
    assert "vocab.json" in caplog.text and "outside the folder" in caplog.text


# ---------------------------------------------------------------------------------------- output folders
def test_failed_final_rename_puts_the_old_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real_replace = os.replace

    def failing(a: object, b: object) -> None:
        if Path(b) == out and ".tmp-" in Path(a).name:
            raise OSError(errno.EIO, "I/O error (injected)")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert tree(tmp_path) == {"out/a.txt": b"old"}  # old output back, nothing hidden left


def test_when_rollback_fails_too_both_outputs_are_kept_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real_replace = os.replace

    def failing(a: object, b: object) -> None:
        if Path(b) == out:
            raise OSError(errno.EIO, "I/O error (injected)")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="both are kept") as caught:
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    old, new = sorted(p.name for p in tmp_path.iterdir())  # the old and the new output, both named in the error
    assert old.startswith(".out.old-") and new.startswith(".out.tmp-")
    assert old in str(caught.value) and new in str(caught.value)
    assert (tmp_path / old / "a.txt").read_text() == "old" and (tmp_path / new / "a.txt").read_text() == "new"


def test_stale_leftovers_of_dead_runs_are_tidied(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    dead, alive = dead_pid(), os.getpid()
    for name in (f".out.tmp-{dead}-0123abcd", f".out.tmp-{alive}-0123abcd", ".out.tmp-legacy12"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-00001.safetensors.partial").write_bytes(b"x")
    (tmp_path / f".out.old-{dead}-89abcdef").mkdir()  # a run died between the two renames of a swap
    (tmp_path / f".out.old-{dead}-89abcdef" / "config.json").write_text("previous")
    with caplog.at_level(logging.WARNING, logger="hf_moe.files"):
        actions = clean_stale(out)
    assert (out / "config.json").read_text() == "previous"  # put back, since out was missing
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{alive}-0123abcd", ".out.tmp-legacy12", "out"]
    assert len(actions) == 4 and all(action in caplog.text for action in actions)
    assert any("removed" in a and str(dead) in a for a in actions)
    assert any("legacy12" in a and "delete it" in a for a in actions)  # reported, not removed
    assert any("running process" in a for a in actions)

    (tmp_path / f".out.old-{dead}-00000000").mkdir()  # out exists now: a backup is just removed
    clean_stale(out)
    assert not (tmp_path / f".out.old-{dead}-00000000").exists() and (out / "config.json").exists()


def test_other_hosts_temporary_folders_are_left_alone(tmp_path: Path) -> None:
    remote = tmp_path / f".out.tmp-{dead_pid()}-0123abcd"
    remote.mkdir()
    (remote / files.OWNER_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    assert "another host" in clean_stale(tmp_path / "out")[0] and remote.exists()


def test_temporary_folder_records_its_owner_and_the_output_does_not(tmp_path: Path) -> None:
    with atomic_output_dir(tmp_path / "out") as tmp:
        owner = json.loads((tmp / files.OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "a.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]


def test_unwritable_parent_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = os.mkdir

    def read_only(path: object, *args: object, **kwargs: object) -> None:  # what mkdir says in a read-only folder
        if Path(path).exists():
            real_mkdir(path, *args, **kwargs)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(PermissionError, match="is not writable") as caught:
        with atomic_output_dir(tmp_path / "out"):
            pass
    assert caught.value.filename == str(tmp_path)


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_raises_like_ctrl_c_inside_and_not_outside() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) == before
    assert issubclass(Terminated, KeyboardInterrupt)


def test_sigterm_during_a_write_removes_the_temporary_folder(tmp_path: Path) -> None:
    with pytest.raises(Terminated):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            signal.raise_signal(signal.SIGTERM)
            for _ in range(1000):
                pass
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- files
def test_atomic_files_replace_together_or_not_at_all(tmp_path: Path) -> None:
    a, b = tmp_path / "delta.safetensors", tmp_path / "delta.json"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(OSError, match="No space"):
        with atomic_files(a, b) as (ta, tb):
            ta.write_text("new a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert tree(tmp_path) == {"delta.json": b"old b", "delta.safetensors": b"old a"}
    with atomic_files(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert tree(tmp_path) == {"delta.json": b"new b", "delta.safetensors": b"new a"}
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_an_output_that_is_a_symlink_is_written_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "disk" / "models").mkdir(parents=True)
    (tmp_path / "disk" / "models" / "old.txt").write_text("old")
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "models")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        assert tmp.parent == tmp_path / "disk"  # next to the target: same file system, a plain rename
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "out").is_symlink() and tree(tmp_path / "disk") == {"models/new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]


def test_a_failed_delta_save_keeps_the_earlier_delta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    from hf_moe import MoEForCausalLM
    from hf_moe.training.delta import save_finetuned_delta
    from tests.conftest import tiny_config

    model = MoEForCausalLM(tiny_config())
    save_finetuned_delta(model, tmp_path / "delta")
    before = tree(tmp_path)
    real = safetensors.torch.save_file

    def disk_full(tensors: dict, filename: object, metadata: dict | None = None) -> None:
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_finetuned_delta(model, tmp_path / "delta")
    assert tree(tmp_path) == before  # both files of the earlier delta whole, no temporary files


def test_signals_during_a_swap_wait_until_it_is_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM arriving between the two renames of a swap is delivered after both: never a moment where
    neither the old nor the new output is in place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real_replace = os.replace

    def interrupted_between(a: object, b: object) -> None:
        real_replace(a, b)
        if ".old-" in Path(b).name:  # the old output was just moved aside
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):
                pass

    monkeypatch.setattr(os, "replace", interrupted_between)
    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored (POSIX), and Python then installs no KeyboardInterrupt handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    signal.signal(signal.SIGINT, previous)
    assert tree(tmp_path) == {"out/a.txt": b"new"}  # the swap completed, then Ctrl-C was delivered
