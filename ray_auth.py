"""Ray's token authentication, as sweep.py starts and attaches to Ray (docs/design.md, "Cluster").

Ray >= 2.52 makes every client of a cluster started with RAY_AUTH_MODE=token present one shared
token; 2.59 turned it on by default for the clusters ray.init starts (and for `ray start --head`
where a token file exists), and Ray's docs say 2.61 does so for all clusters. Where a process
takes its token from, first match wins (Ray's docs, "Token Sources and Precedence"): the variable
RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token.

- `local_token_auth`: the local Ray has token authentication on whatever Ray's default, with a
  token of its own that is never written to disk.
- `check_token`: a driver that a cluster refuses gets one line saying why and what to do, at once,
  instead of ray.init's ~20 s of retries and "Failed to connect".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

from cascade.errors import UserError

# What every refusal tells the user to do.
TOKEN_FIX = ("the cluster's token (`ray get-auth-token` on the head node prints it) in "
             "~/.ray/auth_token (a home every node shares), in the file RAY_AUTH_TOKEN_PATH names, "
             "or in RAY_AUTH_TOKEN")

# The local Ray's token: one per process, so that every local Ray this process starts sees the same
# token as Ray's C++ token loader, which caches the first one it reads.
_LOCAL_TOKEN = secrets.token_hex(32)


def local_token_auth() -> None:
    """Set this process's environment for a local Ray with token authentication, whichever way
    Ray's default goes: RAY_AUTH_MODE=token unless it says otherwise, and a token of this
    process's own in RAY_AUTH_TOKEN, which the local Ray's processes inherit.

    Ray's own default writes a token to ~/.ray/auth_token when there is none; that file then
    silently turns token authentication on for a later `ray start --head` (whose drivers, with an
    explicit address, send no token unless RAY_AUTH_MODE=token), and the write fails where the
    home directory is read-only. This token lives only in the local Ray's processes.
    """
    unset = "RAY_AUTH_MODE" not in os.environ
    if os.environ.setdefault("RAY_AUTH_MODE", "token").lower() != "token":
        return
    os.environ["RAY_AUTH_TOKEN"] = _LOCAL_TOKEN
    if unset:
        # Ray read RAY_AUTH_MODE into its C++ config when it was imported; it re-reads it the way
        # its own default does (authentication_token_setup._enable_token_auth), or this driver
        # would send no token to the local Ray it starts (whose processes read the environment).
        from ray._raylet import Config

        Config.initialize("")


def token_source() -> tuple[str, bool]:
    """Where Ray reads this process's token from ("RAY_AUTH_TOKEN" or a file), and whether there is
    a token there. A RAY_AUTH_TOKEN_PATH that cannot be read has none (Ray does not fall back)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN", True
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        return str(path), bool(path.read_text().strip())
    except OSError:
        return str(path), False


def refusal(address: str) -> str:
    """One line for a driver that the cluster at `address` refused: what it sent, and the fix."""
    mode = os.environ.get("RAY_AUTH_MODE")
    source, found = token_source()
    if (mode or "").lower() != "token":
        return (f"Ray at RAY_ADDRESS={address} requires a token (token authentication) and this "
                f"driver sent none (RAY_AUTH_MODE={mode or 'unset'}): export RAY_AUTH_MODE=token, "
                f"with {TOKEN_FIX}")
    if not found:
        return f"RAY_AUTH_MODE=token but there is no token in {source}: put {TOKEN_FIX}"
    return (f"Ray at RAY_ADDRESS={address} refused the token in {source}: it is not the token the "
            f"cluster was started with; put {TOKEN_FIX}")


def check_token(address: str) -> None:
    """UserError (`refusal`) when the cluster at `address` (host:port, or "auto") would refuse this
    driver; call it before ray.init. Returns when the cluster accepts it, or when the probe fails
    for another reason (ray.init then says what that is).

    The probe is a `ray._raylet.GcsClient`, as Ray's own CLI (`ray status`) connects to a cluster:
    it raises Ray's public AuthenticationError at once. A driver in token mode without a token must
    not get that far: there Ray's C++ token loader aborts the process instead of raising.
    tests/test_multinode.py runs it against a real `ray start --head` (Ray 2.60, the lock); a Ray
    upgrade that moves GcsClient fails that test, not a user's sweep.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not token_source()[1]:
        raise UserError(refusal(address))
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return  # Ray resolves it; a refusal is then ray.init's AuthenticationError
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray < 2.52: no token authentication to be refused by
        return
    try:
        with _quiet_stderr():  # the C++ client logs the refusal as well; one line is enough
            GcsClient(address=hostport)
    except AuthenticationError:
        raise UserError(refusal(address)) from None
    except Exception:  # noqa: BLE001 - anything else is ray.init's to report
        return


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the duration (C++ logs bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
