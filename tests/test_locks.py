"""Locks that hold where clusters keep their files (issue 19): cascade.io's Lease and file_lock,
and orchestrator.record's SweepLock / active_run on top of them.

flock is node-local on Lustre (`localflock`), BeeGFS and NFS with `local_lock=flock`, and missing
on Lustre without `-o flock` (ENOSYS). These tests force each path on the local disk of the test
machine: FLARESWEEP_LOCK=lease takes the lease a network mount gets by default, a patched flock
raises ENOSYS, and a lease file written by hand stands for a holder on another node.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cascade import locks
from cascade.errors import UserError
from cascade.locks import Lease, LockHeld, file_lock, lease_path, lock_kind, mount_type
from orchestrator.record import SweepLock, SweepRecord, run_is_live

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- choosing the lock ------------------------------------------------------------------------------


def test_mount_type_reads_proc_mounts(tmp_path):
    if not Path("/proc/mounts").is_file():
        pytest.skip("no /proc/mounts (not Linux)")
    assert mount_type("/proc") == "proc"
    assert mount_type(tmp_path / "not" / "yet") == mount_type(tmp_path)  # longest prefix wins


@pytest.mark.parametrize(("fstype", "kind"), [("nfs4", "lease"), ("lustre", "lease"),
                                              ("beegfs", "lease"), ("fuse.sshfs", "lease"),
                                              ("ext4", "flock"), ("xfs", "flock")])
def test_auto_takes_a_lease_on_network_mounts(tmp_path, monkeypatch, fstype, kind):
    monkeypatch.delenv("FLARESWEEP_LOCK", raising=False)
    monkeypatch.setattr(locks, "mount_type", lambda path: fstype)
    assert lock_kind(tmp_path / "missing" / "folder") == kind
    monkeypatch.setenv("FLARESWEEP_LOCK", "flock")  # the user's word wins
    assert lock_kind(tmp_path) == "flock"


def test_an_unknown_lock_kind_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESWEEP_LOCK", "fcntl")
    with pytest.raises(UserError, match=r"^FLARESWEEP_LOCK='fcntl'; expected one of auto, flock, lease$"):
        lock_kind(tmp_path)


# -- the lease ----------------------------------------------------------------------------------------


def test_a_lease_is_exclusive_names_its_holder_and_is_released(tmp_path):
    first, second = Lease(tmp_path / "x.lease", {"run_id": "r1"}), Lease(tmp_path / "x.lease")
    first.acquire(blocking=False)
    try:
        with pytest.raises(LockHeld) as held:
            second.acquire(blocking=False)
        holder = held.value.holder
        assert (holder["run_id"], holder["pid"], holder["host"]) == ("r1", os.getpid(),
                                                                    socket.gethostname())
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(held.value)
    finally:
        first.release()
    assert not (tmp_path / "x.lease").exists()
    second.acquire(blocking=False)  # free again
    second.release()


def test_the_lease_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    path = tmp_path / "x.lease"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "token": "old"}))
    lease = Lease(path, stale_after_s=3600)
    lease.acquire(blocking=False)
    assert lease.holder()["token"] == lease.token != "old"
    lease.release()


def test_the_lease_of_another_host_is_stale_only_after_its_bound(tmp_path):
    path = tmp_path / "x.lease"
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "token": "theirs"}))
    lease = Lease(path, stale_after_s=30)
    with pytest.raises(LockHeld, match="pid 1 on node-elsewhere"):  # touched just now: alive
        lease.acquire(blocking=False)
    old = time.time() - 31
    os.utime(path, (old, old))  # no heartbeat for longer than the bound: its holder is gone
    lease.acquire(blocking=False)
    assert lease.holder()["host"] == socket.gethostname()
    lease.release()


def test_a_held_lease_stays_fresh_past_its_bound(tmp_path):
    path = tmp_path / "x.lease"
    code = textwrap.dedent(f"""
        import sys
        from cascade.locks import Lease
        lease = Lease({str(path)!r}, stale_after_s=0.6)
        lease.acquire()
        print("held", flush=True)
        sys.stdin.read()
        lease.release()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        time.sleep(1.5)  # 2.5 bounds: only the heartbeat keeps the file's mtime recent
        with pytest.raises(LockHeld):
            Lease(path, stale_after_s=0.6).acquire(blocking=False)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not path.exists()


def test_a_holder_whose_lease_was_broken_notices_and_leaves_the_new_one_alone(tmp_path):
    path = tmp_path / "x.lease"
    first = Lease(path, stale_after_s=0.3)
    first.acquire()
    first._stop.set()  # a stalled holder: its heartbeat stops
    first._beat.join()
    old = time.time() - 5
    os.utime(path, (old, old))
    second = Lease(path, stale_after_s=0.3)
    second.acquire(blocking=False)
    first.release()  # must not delete the second holder's lease
    assert second.holder()["token"] == second.token
    second.release()


# -- file_lock: flock, or a lease where flock fails ---------------------------------------------------


def test_flock_enosys_falls_back_to_an_exclusive_lease(tmp_path, monkeypatch):
    monkeypatch.delenv("FLARESWEEP_LOCK", raising=False)

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without -o flock

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    lock = tmp_path / "base.lock"
    with file_lock(lock) as kind:
        assert kind == "lease" and lease_path(lock).is_file()
        with pytest.raises(BlockingIOError), file_lock(lock, blocking=False):
            pass
    assert not lease_path(lock).exists()


def test_other_flock_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(locks.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"), file_lock(tmp_path / "x.lock"):
        pass


# -- the sweep lock ---------------------------------------------------------------------------------


def _driver(sweep_dir: Path, run_id: str, go: Path) -> subprocess.Popen:
    """A process that waits for `go`, then takes the SweepLock of `sweep_dir` (as `sweep.py run`
    does) and prints "held <run id>", or prints the refusal; it holds the lock until stdin closes."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from cascade.errors import UserError
        from orchestrator.record import SweepLock
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            with SweepLock({str(sweep_dir)!r}, {run_id!r}) as lock:
                print("held", {run_id!r}, lock.kind, flush=True)
                sys.stdin.read()
        except UserError as exc:
            print("refused", exc, flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_two_drivers_in_two_processes_exactly_one_runs_the_other_says_who(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("FLARESWEEP_LOCK", kind)
    sweep_dir, go = tmp_path / "results" / "mini", tmp_path / "go"
    procs = {run: _driver(sweep_dir, run, go) for run in ("run-a", "run-b")}
    time.sleep(1.0)  # both interpreters are up and polling for `go`
    go.touch()
    lines = {}
    try:
        for run, proc in procs.items():
            lines[run] = proc.stdout.readline().strip()
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=30)
    held = [run for run, line in lines.items() if line.startswith("held")]
    assert len(held) == 1, lines
    winner, loser = held[0], ({"run-a", "run-b"} - set(held)).pop()
    assert lines[winner] == f"held {winner} {kind}"
    pid = procs[winner].pid
    assert lines[loser].startswith(f"refused {sweep_dir} is in use by another `sweep.py run` (run "
                                   f"{winner}, pid {pid} on {socket.gethostname()}"), lines[loser]
    assert lines[loser].endswith("wait for it or stop it first")


def test_a_sweep_lock_where_flock_is_missing_is_a_lease(tmp_path, monkeypatch):
    monkeypatch.delenv("FLARESWEEP_LOCK", raising=False)

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    record = SweepRecord(tmp_path)
    with SweepLock(tmp_path, "run-a") as lock:
        assert lock.kind == "lease" and lease_path(tmp_path / ".lock").is_file()
        assert record.active_run() == "run-a"
        with pytest.raises(UserError, match=r"in use by another `sweep.py run` \(run run-a, pid"):
            SweepLock(tmp_path, "run-b").__enter__()
    assert record.active_run() is None
    assert json.loads((tmp_path / "run.json").read_text())["ended"] > 0


def test_a_killed_driver_on_this_host_leaves_nothing_held(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESWEEP_LOCK", "lease")
    go = tmp_path / "go"
    go.touch()
    proc = _driver(tmp_path, "run-a", go)
    assert proc.stdout.readline().startswith("held run-a")
    record = SweepRecord(tmp_path)
    assert record.active_run() == "run-a"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert record.active_run() is None  # its pid is gone from this host
    with SweepLock(tmp_path, "run-b") as lock:  # the lease of a dead pid is broken at once
        assert lock.kind == "lease" and record.active_run() == "run-b"


def test_the_heartbeat_keeps_a_long_run_active_and_a_silent_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESWEEP_LEASE_STALE_S", "0.6")
    record = SweepRecord(tmp_path)
    with SweepLock(tmp_path, "run-a"):
        time.sleep(1.5)
        assert record.active_run() == "run-a"
    now = time.time()
    other = {"run_id": "x", "host": "node-elsewhere", "pid": 1}
    assert run_is_live({**other, "updated": now - 0.3}, now)
    assert not run_is_live({**other, "updated": now - 0.9}, now)  # another node, silent too long
    assert not run_is_live({**other, "updated": now, "ended": now}, now)
    assert not run_is_live({**other, "host": socket.gethostname(), "pid": _dead_pid(),
                            "updated": now}, now)
    assert not run_is_live({"run_id": "old", "started": now - 3600}, now)  # run.json of before


def test_status_never_makes_a_starting_run_fail(tmp_path):
    """`status` used to take a brief shared flock, so a `run` starting at that moment failed."""
    record, stop, reads = SweepRecord(tmp_path), threading.Event(), [0]

    def status_loop() -> None:
        while not stop.is_set():
            record.active_run()
            reads[0] += 1

    code = ("import sys; from orchestrator.record import SweepRecord\n"
            f"r = SweepRecord({str(tmp_path)!r})\n"
            "while sys.stdin.readable():\n    r.active_run()\n")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE)
    threads = [threading.Thread(target=status_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(60):  # the shared-flock status of before failed ~1 start in 30 here
            with SweepLock(tmp_path, f"run-{i}"):
                pass
    finally:
        stop.set()
        for t in threads:
            t.join()
        other.kill()
        other.wait()
    assert reads[0] > 60


def test_status_works_on_a_read_only_mount(tmp_path, monkeypatch):
    with SweepLock(tmp_path, "run-a"):
        record = SweepRecord(tmp_path)
        real_open, real_os_open = builtins.open, os.open

        def read_only_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, mode, *args, **kwargs)

        def read_only_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", read_only_open)
        monkeypatch.setattr(os, "open", read_only_os_open)
        try:
            assert record.active_run() == "run-a"
            assert [s.state for s in record.statuses([("k1-l0.5-s0-abc", "masked-x")])] == ["pending"]
        finally:
            monkeypatch.undo()


def test_build_once_builds_exactly_once_among_concurrent_callers(tmp_path):
    # Four threads race for one target; the build is slow and publishes by rename. Exactly one
    # call builds; the others return once it is there. A second round finds it without a lock.
    import threading

    from cascade.locks import build_once

    target = tmp_path / "artifact.bin"
    calls: list[int] = []

    def build() -> None:
        calls.append(1)
        time.sleep(0.2)
        tmp = tmp_path / ".artifact.tmp"
        tmp.write_bytes(b"done")
        os.replace(tmp, target)

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(target, build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results) == [False, False, False, True]
    assert target.read_bytes() == b"done"
    assert build_once(target, build) is False and len(calls) == 1
