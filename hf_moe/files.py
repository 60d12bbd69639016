"""Safe file handling for everything hf_moe reads, writes or copies (conversion, upcycling, publishing, deltas).

The rules, in one place:

- A name read from a file (an index's shard names) or copied out of a folder resolves inside that folder:
  absolute names, `..` and symlinks leading out of it are refused (`resolve_inside`). The one exception is the
  Hugging Face cache, whose snapshot folders are symlinks into the repository's own `blobs/`.
- An output never overlaps its source: not the same folder, not a folder containing it, not one inside it
  (`check_disjoint`, `check_output_dir`).
- An output folder is written as a hidden temporary sibling `.OUT.tmp-<pid>-<random>` and swapped in only when
  complete (`atomic_output_dir`): an old `OUT` is moved aside, the new one renamed into place, the old one deleted;
  a failed rename puts the old one back. A crash, a full disk, Ctrl-C or SIGTERM (handled like SIGINT while an
  output is being written) leaves `OUT` as it was.
- Temporary siblings of killed runs (SIGKILL, power loss) are found by the next run for the same output and
  removed when their owner process is gone, or put back when a run died between the two renames of a swap
  (`clean_stale`); what was done is logged.
- Single files are replaced atomically too (`write_text_atomic`), and only regular files inside a folder are
  copied, never symlinks leading out of it (`copy_inside`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The file inside a temporary output folder naming its owner (removed before the folder becomes the output).
OWNER_FILE = ".hf_moe-owner.json"
_TEMP_KINDS = ("tmp", "old")  # ".OUT.tmp-*": being written; ".OUT.old-*": the previous OUT during a swap
_OWNED = re.compile(r"^(?P<pid>\d+)-[0-9a-f]{8}$")


class UnsafePathError(ValueError):
    """A path that would read or write outside the folder it belongs to."""


class OverlappingFoldersError(FileExistsError, ValueError):
    """An output folder that is, contains or lies inside its source folder."""


class BadFileError(ValueError):
    """A file that exists but cannot be parsed (invalid JSON, binary data where text was expected)."""


class SwapError(OSError):
    """Neither the new output could take its place nor the previous one be put back: both are kept, named."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received while an output was being written (raised like Ctrl-C, so the same cleanup runs)."""


# ------------------------------------------------------------------------------------------------ reading
def read_json(path: str | os.PathLike, expect: type = dict) -> Any:
    """The JSON value in `path`; raises BadFileError naming the file and what is wrong (not UTF-8 text, invalid
    JSON with line and column, or a value that is not an `expect`, e.g. a list where an object belongs)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadFileError(f"{path} is not UTF-8 text (a binary file?): cannot read it as JSON.") from error
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadFileError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
                           ) from error  # fmt: skip
    if expect is not None and not isinstance(value, expect):
        kind = "an object ({...})" if expect is dict else expect.__name__
        raise BadFileError(f"{path} must hold {kind}, but holds {type(value).__name__} {_short(value)}.")
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------- paths
def _roots(folder: Path) -> list[Path]:
    """Where files of `folder` may really live: the folder itself and, for a Hugging Face cache snapshot
    (`.../models--org--name/snapshots/<rev>`), that repository's `blobs/` (its files are symlinks there)."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent / "blobs")
    return roots


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(folder: str | os.PathLike, name: str, *, source: str | None = None) -> Path:
    """`folder / name`, checked to stay inside `folder`: `name` must be a relative path without `..`, and the
    resolved file (symlinks followed) must lie in the folder (or a cache snapshot's blobs). `source` says where
    the name came from (e.g. "model.safetensors.index.json entry 'lm_head.weight'") for the error."""
    folder = Path(folder)
    where = f"{source}: " if source else ""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{where}file name {name!r} is invalid: expected a relative file name inside {folder}.")
    parts = Path(name).parts
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
        raise UnsafePathError(f"{where}file name {name!r} points outside the folder {folder}: only relative names "
                              "inside the folder are allowed (no absolute paths, no '..').")  # fmt: skip
    path = folder / name
    real = path.resolve()
    if not any(_within(real, root) for root in _roots(folder)):
        raise UnsafePathError(f"{where}{path} is a symlink to {real}, outside the folder {folder}: refused "
                              "(copy the file into the folder if it belongs to the checkpoint).")  # fmt: skip
    return path


def check_disjoint(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse an output folder that is the source folder, contains it or lies inside it (symlinks resolved):
    writing (or replacing) it would overwrite or delete the source."""
    src_real, out_real = Path(src).resolve(), Path(out).resolve()
    if out_real == src_real:
        raise OverlappingFoldersError(f"Output {str(out)!r} is the source folder {str(src)!r}: choose another "
                                      "output folder.")  # fmt: skip
    if src_real in out_real.parents:
        raise OverlappingFoldersError(f"Output folder {str(out)!r} is inside the source folder {str(src)!r}: "
                                      "choose an output folder outside it.")  # fmt: skip
    if out_real in src_real.parents:
        raise OverlappingFoldersError(f"Output folder {str(out)!r} contains the source folder {str(src)!r}: "
                                      "replacing it would delete the source; choose an output folder outside it.")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, src: str | os.PathLike | None = None) -> Path:
    """Refuse an output that overlaps the source (`check_disjoint`), that exists and is not a folder, or that is
    a non-empty folder unless `overwrite`. Returns `out` as a Path."""
    out = Path(out)
    if src is not None:
        check_disjoint(src, out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"Output {str(out)!r} exists and is not a folder.")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"Output folder {str(out)!r} exists and is not empty: pass overwrite=True (--overwrite) to replace it."
            )
    return out


# ------------------------------------------------------------------------------------ temporary siblings
def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def find_stale(out: str | os.PathLike) -> list[tuple[Path, str]]:
    """Temporary siblings of `out` left by earlier runs, with their state: "dead" (the owner process is gone),
    "running" (it still runs), "remote" (written from another host: cannot tell) or "unknown" (no owner
    recorded, e.g. from an older hf_moe version)."""
    out = Path(out)
    found = []
    if not out.parent.is_dir():
        return found
    host = socket.gethostname()
    for kind in _TEMP_KINDS:
        prefix = f".{out.name}.{kind}-"
        for path in sorted(out.parent.glob(f"{_glob_escape(prefix)}*")):
            match = _OWNED.match(path.name[len(prefix):])
            if match is None or not path.is_dir() or path.is_symlink():
                found.append((path, "unknown"))
                continue
            owner = _owner(path)
            if owner.get("host", host) != host:
                found.append((path, "remote"))
            else:
                found.append((path, "running" if _pid_alive(int(match["pid"])) else "dead"))
    return found


def _glob_escape(text: str) -> str:
    """`text` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads((path / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def clean_stale(out: str | os.PathLike) -> list[str]:
    """Tidy what killed runs left next to `out`, and say so (logged as warnings; also returned):

    - a previous `out` moved aside by a run that died before the new one took its place (`out` missing) is
      put back; once `out` exists, such a backup is removed;
    - temporary folders of dead runs are removed;
    - folders of running processes, of other hosts, or without an owner are left alone and reported.
    """
    out = Path(out)
    actions = []
    for path, state in find_stale(out):
        is_backup = path.name.startswith(f".{out.name}.old-")
        if state == "dead" and is_backup and not (out.exists() or out.is_symlink()):
            os.replace(path, out)
            actions.append(f"restored the previous output {out} from {path.name} (left by a run that was killed "
                           "while replacing it)")  # fmt: skip
        elif state == "dead":
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {path} (left by a killed run)")
        elif state == "unknown":
            actions.append(f"found {path}, a temporary folder without an owner (an earlier run or an older hf_moe "
                           "version): delete it if no conversion is running")  # fmt: skip
        else:
            actions.append(f"left {path} alone: it belongs to a {'running process' if state == 'running' else 'process on another host'}")
    for action in actions:
        logger.warning("%s", action)
    return actions


def _make_temp(out: Path) -> Path:
    """The temporary sibling of `out` (usual permissions, owner recorded)."""
    try:
        tmp = _sibling(out, "tmp")
        tmp.mkdir()
    except PermissionError as error:
        raise PermissionError(error.errno, f"Cannot write the output {out}: its folder {out.parent} is not "
                              "writable", str(out.parent)) from error  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    (tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "output": str(out)}))
    return tmp


# ------------------------------------------------------------------------------------------------ signals
@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so cleanup written
    for Ctrl-C runs for `kill` too. A handler installed by someone else is left in place."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL, None,
    ):  # fmt: skip
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a few renames run: they are recorded and sent again afterwards, so the
    handler in place (Ctrl-C, `terminate_as_interrupt`) runs once the renames are done, never between them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(pending):  # to this (the main) thread: a process-directed kill could reach
            signal.raise_signal(signum)        # another thread, and the handler would run only later


# ------------------------------------------------------------------------------------------------ writing
def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file of `folder` and the folder itself to disk (before it is renamed into place)."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system can fsync a directory
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def swap_in(tmp: Path, out: Path) -> None:
    """Make the complete folder `tmp` the output `out`, replacing an existing `out` with rollback: the old one is
    moved aside, `tmp` renamed to `out`, then the old one deleted; if the second rename fails the old one is
    put back (and if that fails too, the error names where both are)."""
    with _signals_deferred():
        if not (out.exists() or out.is_symlink()):
            os.replace(tmp, out)
        else:
            old = _sibling(out, "old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException as error:
                try:
                    os.replace(old, out)
                except OSError as restore_error:
                    raise SwapError(error.errno if isinstance(error, OSError) else errno.EIO,
                                    f"Could not rename the new output {tmp} to {out} ({error}) nor put the previous "
                                    f"output back from {old} ({restore_error}): both are kept, rename the one you "
                                    f"want to {out.name}") from error  # fmt: skip
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike, overwrite: bool = False, src: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; when the block completes it becomes `out` (`swap_in`: an old `out`
    is replaced only then, and restored if the final rename fails). On any exception, Ctrl-C or SIGTERM the
    temporary folder is deleted and `out` is left as it was. Leftovers of killed runs are tidied first
    (`clean_stale`). Refuses what `check_output_dir` refuses."""
    out = check_output_dir(out, overwrite, src)
    if out.is_symlink():  # write where the link points (its file system, its name), keep the link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    check_output_dir(out, overwrite, src)  # a restored backup counts as an existing output
    with terminate_as_interrupt():
        tmp = _make_temp(out)
        try:
            yield tmp
            check_output_dir(out, overwrite, src)  # it may have appeared meanwhile
            (tmp / OWNER_FILE).unlink()
            fsync_tree(tmp)
            swap_in(tmp, out)
        except SwapError:
            raise  # the new output is one of the two folders the error names: keep it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary sibling per file in `paths` to write; when the block completes they are flushed and
    renamed to `paths` together (SIGINT/SIGTERM deferred between the renames), replacing old files atomically.
    On any failure the temporary files are deleted and the old files are left as they were."""
    targets = [Path(path) for path in paths]
    temps: list[Path] = []
    try:
        for path in targets:
            descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
            os.close(descriptor)
            temps.append(Path(name))
        yield list(temps)
        for tmp in temps:
            tmp.chmod(0o666 & ~_umask())
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        with _signals_deferred():
            for tmp, path in zip(temps, targets):
                os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of the file `path` to write; when the block completes it replaces `path`
    atomically (`atomic_files`), on any failure it is deleted and `path` is left as it was."""
    with atomic_files(path) as (tmp,):
        yield tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the file `path` by `text` (UTF-8) atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def copy_inside(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Copy the files `names` of the folder `src` that exist into `dst` (contents only; no metadata or links).
    Only regular files whose real location is inside `src` are copied; a symlink leading out of it is skipped
    with a warning. Returns the copied names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in names:
        path = src / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            real = resolve_inside(src, name).resolve()
        except UnsafePathError as error:
            logger.warning("Not copied: %s", error)
            continue
        if not real.is_file():
            logger.warning("Not copied: %s is not a regular file.", path)
            continue
        shutil.copyfile(real, dst / name)
        copied.append(name)
    return copied


__all__ = [
    "OWNER_FILE",
    "BadFileError",
    "OverlappingFoldersError",
    "SwapError",
    "Terminated",
    "UnsafePathError",
    "atomic_file",
    "atomic_files",
    "atomic_output_dir",
    "check_disjoint",
    "check_output_dir",
    "clean_stale",
    "copy_inside",
    "find_stale",
    "fsync_tree",
    "read_json",
    "resolve_inside",
    "swap_in",
    "terminate_as_interrupt",
    "write_text_atomic",
]
