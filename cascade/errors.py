"""One exception type for mistakes a user can fix (bad path, bad key, bad value).

Command-line entry points catch `UserError` and print its message as one line, with no traceback,
and exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input; the message names the file/key and what was expected."""


def brief(exc: BaseException, limit: int = 300) -> str:
    """The exception on one line with its type, cut to `limit` characters (torch's load errors
    span many lines)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def first_line(text: object, default: str = "") -> str:
    """The first non-empty line of `str(text)`, stripped; `default` when there is none (or None).

    For one-line error summaries: exception messages, error.json, a YAML error's problem.
    """
    if text is None:
        return default
    return next((line.strip() for line in str(text).splitlines() if line.strip()), default)


def cli_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a CLI `main`: a `UserError` becomes `error: <message>` on stderr and exit code 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
