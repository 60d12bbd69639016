"""What the `hf-moe` command checks and says: argparse `type=` validators for option values, and the one-line
message (plus exit code) for an error raised by a library call."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

#: Exceptions that mean "the input is wrong" (a bad file, folder, value or option): exit code 2, one line.
#: Anything else is unexpected (exit code 1, still one line; `--debug` shows the traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, TypeError, LookupError, ImportError)


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (a positive integer is needed)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: must be a positive integer (>= 1)")
    return value


def _number(text: str, allowed: str, ok: Callable[[float], bool]) -> float:
    """`text` as a finite float for which `ok` holds, else argparse's error naming the value and `allowed`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number ({allowed} is needed)") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: must be {allowed}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a capacity factor, a rate)."""
    return _number(text, "a finite number > 0", lambda value: value > 0)


def fraction(text: str) -> float:
    """A number in (0, 1] (a cumulative share or probability)."""
    return _number(text, "a number in (0, 1]", lambda value: 0 < value <= 1)


def shard_size(text: str) -> str:
    """A shard size the library understands ("500MB", "2GB", "1.5GiB", a number of bytes); returned as given."""
    from .conversion.checkpoint_io import parse_size

    try:
        parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("max_shard_size=", "", 1)) from None
    return text


def user_error_message(error: BaseException) -> tuple[str, int]:
    """One line saying what went wrong (the file and value named where the error knows them) and the exit code."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        message = f"{error.strerror}: {where}"
    else:
        message = str(error) or type(error).__name__
    cause = error.__cause__ or error.__context__
    if _is_datasets_error(error) and cause is not None and str(cause) not in message:
        message = f"{message}: {cause}"  # datasets' own messages are generic ("An error occurred while ...")
    message = re.sub(r"\s*\n\s*", "; ", message.strip()).replace(":;", ":")
    if isinstance(error, USER_ERRORS) or _is_user_library_error(error):
        return message, 2
    return f"{message} (unexpected {type(error).__name__}: rerun with --debug for the traceback)", 1


def _is_datasets_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("datasets")


def _is_user_library_error(error: BaseException) -> bool:
    """safetensors' and datasets' errors about a file (they derive from Exception only)."""
    return type(error).__name__ == "SafetensorError" or _is_datasets_error(error)


__all__ = ["USER_ERRORS", "fraction", "positive_int", "shard_size", "user_error_message"]
