"""What the tests that run the README's cluster commands share (tests/test_multinode.py, the real
SLURM half of tests/test_slurm.py): the README's "On a Ray cluster" section, a home with a Ray
token made as the README makes it, the environment a user's shell has after that section, a
`PYTHON` that runs sweep.py with test_sweep's fake trainer, and `ray start --block` nodes that a
test ends by their pid.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from test_sweep import FAKE_MAIN, ROOT, TESTS

README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent


def cluster_section() -> str:
    """The README's "On a Ray cluster" section, up to the next heading of its level or above."""
    text = README.read_text()
    start = text.index("### On a Ray cluster")
    ends = [i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0]
    return text[start:min(ends)]


def readme_command(prefix: str) -> str:
    """The command of the README's cluster section that starts with `prefix`, continuation lines
    joined and its comment dropped."""
    lines = cluster_section().replace("\\\n", " ").splitlines()
    found = [line.split("  #")[0].strip() for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"the README's cluster section has {len(found)} commands {prefix!r}..."
    return " ".join(found[0].split())


def substitute(command: str, changes: dict[str, str]) -> str:
    """`command` with each key replaced by its value (host names, paths); a key that is not in it
    fails, so that a changed README fails the test instead of going untested."""
    for old, new in changes.items():
        assert old in command, f"{old!r} is no longer in the README's {command!r}"
        command = command.replace(old, new)
    return command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_venv(path: str) -> str:
    """PATH without the virtual environment's bin/: no `ray` or `python` of the venv on it."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if Path(p) != VENV_BIN)


def user_env(home: Path, *, venv: bool = True, **extra: str) -> dict[str, str]:
    """A shell after the README's cluster section: the venv activated (`venv`), RAY_AUTH_MODE=token,
    RAY_process_group_cleanup_enabled=true, HOME with the token. No RAY_* or SLURM_* variable of
    this process leaks in (a local Ray started by an earlier test sets RAY_AUTH_TOKEN), and the fake
    trainer is importable (PYTHONPATH=tests/)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "SLURM_", "SBATCH_")) and k != "VIRTUAL_ENV"}
    path = without_venv(env.get("PATH", ""))
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{path}" if venv else path, HOME=str(home),
               RAY_AUTH_MODE="token", RAY_process_group_cleanup_enabled="true",
               PYTHONPATH=str(TESTS), PYTHONUNBUFFERED="1", **extra)
    return env


def token_home(tmp_path: Path) -> Path:
    """A home directory holding a Ray token, made with the README's own command."""
    home = tmp_path / "home"
    home.mkdir()
    step = readme_command("(umask 077; ray get-auth-token")
    done = subprocess.run(["bash", "-c", step], env=user_env(home), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr  # no token shown
    token = home / ".ray" / "auth_token"
    assert len(token.read_text().strip()) >= 32
    assert stat.S_IMODE(token.stat().st_mode) == 0o600  # only its owner reads it
    return home


def fake_python(tmp_path: Path) -> Path:
    """An interpreter for the README's commands (`make sweep PY=...`, sbatch's PYTHON): the venv's
    Python, except that `sweep.py ...` runs sweep.main with test_sweep's fake trainer and base."""
    path = tmp_path / "bin" / "python"
    path.parent.mkdir(exist_ok=True)
    python = shlex.quote(sys.executable)
    path.write_text("#!/bin/bash\n"
                    f'if [[ $1 == sweep.py ]]; then shift; exec {python} -c {shlex.quote(FAKE_MAIN)} "$@"; fi\n'
                    f'exec {python} "$@"\n')
    path.chmod(0o755)
    return path


class RayNode:
    """One `ray start ... --block` process, its output in `log`. Ray starts the node's processes
    (GCS, raylet, agents, workers) as its children, fate-shared with it (PR_SET_PDEATHSIG), so
    ending this one pid ends the node; `stop` also checks that nothing of it is left."""

    def __init__(self, command: str, extra: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        # Marks every process of this node (children inherit the environment): `leftovers`.
        self.tag = f"{log.stem}-{os.getpid()}-{time.monotonic_ns()}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([*shlex.split(command), *extra, "--block"], cwd=ROOT,
                                         env={**env, "FLARESWEEP_TEST_NODE": self.tag},
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"`ray start` did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL, as a lost node: the kernel kills the node's processes with it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> list[str]:
        """End the node (TERM, then KILL after 30 s) and whatever of it is still running 20 s
        later; returns what had to be killed that way (empty when Ray cleaned up after itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.time() + 20
        while (left := self.leftovers()) and time.time() < deadline:
            time.sleep(0.5)
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"{pid} {cmd}" for pid, cmd in left]

    def leftovers(self) -> list[tuple[int, str]]:
        """(pid, command line) of the live processes that carry this node's tag."""
        marker = f"FLARESWEEP_TEST_NODE={self.tag}".encode()
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                    if (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                        out.append((int(proc.name), cmd))
            except OSError:
                continue
        return out
