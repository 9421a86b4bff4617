"""Locks on files, one helper for every use: `file_lock` (cached bases, test sets, the demo
encoder, stream-cache shards, the sweep folder's run lock, the fingerprint cache).

An flock on local disks; on network file systems (where flock is missing, unreliable or local to
one client) an O_EXCL `Lease` file naming its holder (host, pid) with a heartbeat, broken when it
goes stale (`lock_kind`; `FLARESWEEP_LOCK=flock|lease` forces one). Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cascade.errors import UserError
from cascade.io import UMASK

# -------------------------------------------------------------------------------------------

# File systems more than one machine mounts (from /proc/mounts); anything else counts as local.
# `fuse.` covers FUSE network mounts (sshfs, s3fs, gcsfuse, ...).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph",
              "glusterfs", "panfs", "wekafs", "afs", "9p", "fuse.")
LOCK_KINDS = ("auto", "flock", "lease")
LEASE_STALE_S = 60.0
"""A lease whose file was not touched for this long belongs to a dead (or hung) holder and may be
broken; its holder touches it every LEASE_STALE_S / 6. `$FLARESWEEP_LEASE_STALE_S` overrides it."""
_BREAK_GUARD_STALE_S = 10.0  # a breaker that died inside `_break` leaves its guard file this long
# flock on Lustre without `-o flock` (ENOSYS), some NFS/FUSE mounts (ENOLCK, EOPNOTSUPP, EINVAL).
_FLOCK_UNSUPPORTED = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
_log = logging.getLogger(__name__)


def mount_type(path: str | os.PathLike) -> str:
    """The file-system type of the mount holding `path` ("ext4", "nfs4", "lustre", ...), from
    /proc/mounts (longest matching mount point); "" where that cannot be read (not Linux)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    where = str(Path(path).resolve())
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes blanks in mount points as octal (\040 = space).
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def on_network_fs(path: str | os.PathLike) -> bool:
    """True when `path` lies on a file system other machines can mount too (NETWORK_FS)."""
    return mount_type(path).startswith(NETWORK_FS)


def lock_kind(folder: str | os.PathLike) -> str:
    """"flock" or "lease": how locks in `folder` are taken.

    `$FLARESWEEP_LOCK` (auto | flock | lease) decides; "auto" (the default) takes a lease on a
    network file system and flock elsewhere. flock is not enough there: Lustre without `-o flock`
    refuses it (ENOSYS), and with `localflock`, BeeGFS's default or NFS `local_lock=flock` it only
    excludes processes of the same machine, so two drivers on two login nodes would both "hold" it.
    """
    kind = os.environ.get("FLARESWEEP_LOCK", "auto").strip().lower() or "auto"
    if kind not in LOCK_KINDS:
        raise UserError(f"FLARESWEEP_LOCK={kind!r}; expected one of {', '.join(LOCK_KINDS)}")
    if kind == "auto":
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
            probe = probe.parent
        kind = "lease" if on_network_fs(probe) else "flock"
    return kind


def lease_stale_s() -> float:
    """LEASE_STALE_S, or `$FLARESWEEP_LEASE_STALE_S` (seconds > 0)."""
    raw = os.environ.get("FLARESWEEP_LEASE_STALE_S")
    if not raw:
        return LEASE_STALE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"FLARESWEEP_LEASE_STALE_S={raw!r}; expected a number of seconds > 0")
    return value


def pid_alive(pid: Any) -> bool:
    """Whether a process with this id exists on this machine (False for a non-integer)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    """"pid 123 on node7, 4s ago" for a lease or run record; "an unknown holder" without one."""
    if not holder:
        return "an unknown holder"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    updated = holder.get("updated")
    if isinstance(updated, (int, float)):
        text += f", alive {max(0.0, time.time() - updated):.0f}s ago"
    return text


class LockHeld(BlockingIOError):
    """A lock someone else holds; `holder` is what is known about them (host, pid, ...) or None."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        super().__init__(errno.EWOULDBLOCK, f"{path} is held by {describe_holder(holder)}")
        self.holder = holder


class Lease:
    """A lock file that works on any shared file system: created with O_EXCL, owned by host + pid.

    The holder writes `{"host", "pid", "token", "created", ...owner}` into the file and touches it
    every `stale_after_s / 6` from a daemon thread (`os.utime` on its own descriptor, so a holder
    that lost the lease never touches the new holder's file). A lease is stale, and broken by the
    next taker, when its holder is on this host and its pid is gone, or when the file was not
    touched for `stale_after_s` (mtime, set by the file server on NFS, against the taker's clock:
    nodes are assumed NTP-synchronised to well under the bound). Breaking happens under a guard
    file (also O_EXCL) and re-checks the holder's token, so a fresh lease is never removed.
    O_EXCL creation is atomic on NFSv3+, Lustre, GPFS, BeeGFS and local disks.
    """

    def __init__(self, path: str | os.PathLike, owner: Mapping[str, Any] | None = None,
                 stale_after_s: float | None = None) -> None:
        self.path = Path(path)
        self.owner = dict(owner or {})
        self.stale_after_s = lease_stale_s() if stale_after_s is None else stale_after_s
        self.token = ""
        self.lost = False  # the lease was broken by someone else while we held it
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lease now (its JSON, plus `updated`: the file's mtime), or None if free."""
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except ValueError:  # being written right now (create and write are two steps)
            info = None
        info = info if isinstance(info, dict) else {}
        return {**info, "updated": st.st_mtime}

    def is_stale(self, holder: Mapping[str, Any] | None) -> bool:
        """Whether `holder` (from `holder()`) is dead: gone from this host, or silent too long."""
        if holder is None:
            return True
        if holder.get("host") == socket.gethostname() and "pid" in holder and not pid_alive(holder["pid"]):
            return True
        return time.time() - float(holder.get("updated", 0.0)) > self.stale_after_s

    def acquire(self, blocking: bool = True, poll_s: float = 0.25) -> None:
        """Take the lease; LockHeld when someone alive holds it and not `blocking`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            token = uuid.uuid4().hex
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~UMASK)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and self.is_stale(holder):
                    self._break(holder.get("token"))
                    continue
                if not blocking:
                    raise LockHeld(self.path, holder) from None
                time.sleep(poll_s)
                continue
            info = {**self.owner, "host": socket.gethostname(), "pid": os.getpid(), "token": token,
                    "created": time.time()}
            os.write(fd, json.dumps(info, sort_keys=True).encode("utf-8"))
            os.fsync(fd)
            self._fd, self.token, self.lost = fd, token, False
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.path.name}",
                                          daemon=True)
            self._beat.start()
            return

    def release(self) -> None:
        """Give the lease back (idempotent); a lease someone broke in between is left to them."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._owns():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd, self._beat = None, None

    def _owns(self) -> bool:
        holder = self.holder()
        return holder is not None and holder.get("token") == self.token

    def _heartbeat(self) -> None:
        interval = max(0.05, self.stale_after_s / 6)
        while not self._stop.wait(interval):
            if not self._owns():
                self.lost = True
                _log.warning("%s: lease lost (broken by another process after %.0fs without a "
                             "heartbeat?)", self.path, self.stale_after_s)
                return
            with contextlib.suppress(OSError):
                os.utime(self._fd)  # the inode we created, even if the path now names another

    def _break(self, token: Any) -> None:
        """Remove a stale lease whose token is `token`, unless someone replaced it meanwhile."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~UMASK)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > _BREAK_GUARD_STALE_S:
                    guard.unlink()  # its breaker died inside this function
            time.sleep(0.05)
            return
        try:
            holder = self.holder()
            if holder is not None and holder.get("token") == token and self.is_stale(holder):
                _log.warning("%s: breaking the stale lease of %s", self.path, describe_holder(holder))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()


def lease_path(path: str | os.PathLike) -> Path:
    """The lease file standing for lock `path` (`x.lock` -> `x.lock.lease`)."""
    target = Path(path)
    return target.with_name(target.name + ".lease")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False, blocking: bool = True,
              owner: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Hold a lock on `path` for the block; yields its kind, "flock" or "lease" (`lock_kind`).

    flock (local disks): an advisory `flock` on `path` (created, with its folders, if missing); it
    belongs to the open file description, so it dies with its process. A file system that refuses
    flock (ENOSYS, ENOLCK, ...) gets a lease instead. lease (network file systems): a `Lease` on
    `path` + ".lease", holding `owner` beside host and pid. Exclusive unless `shared` (a shared
    lease only waits for no one to hold the lease). Blocking waits until granted; with
    `blocking=False` a lock held elsewhere raises BlockingIOError (LockHeld for a lease) at once.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = lock_kind(target.parent)
    if kind == "flock":
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        with open(target, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), mode)
            except OSError as exc:
                if exc.errno not in _FLOCK_UNSUPPORTED:
                    raise
                _log.info("%s: flock is not supported here (%s); using a lease file", target,
                          errno.errorcode.get(exc.errno, exc.errno))
                kind = "lease"
            else:
                try:
                    yield kind
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return
    lease = Lease(lease_path(target), owner)
    if shared:
        while (holder := lease.holder()) is not None and not lease.is_stale(holder):
            if not blocking:
                raise LockHeld(lease.path, holder)
            time.sleep(0.25)
        yield kind
        return
    lease.acquire(blocking=blocking)
    try:
        yield kind
    finally:
        lease.release()


def build_once(target: str | os.PathLike, build: Callable[[], None],
               lock: str | os.PathLike | None = None) -> bool:
    """Make `target` exist, built by exactly one of any number of concurrent callers.

    `build()` must publish `target` atomically (a rename), so that it only ever appears complete:
    then a caller that finds it needs no lock. Otherwise the first to get the exclusive
    `file_lock` on `lock` (default `<target>.lock`) builds it and the others wait and find it
    ready. True when this call ran `build`.
    """
    path = Path(target)
    if path.exists():
        return False
    with file_lock(Path(lock) if lock is not None else path.with_suffix(".lock")):
        if path.exists():  # built by another caller while this one waited
            return False
        build()
    return True
