"""cascade.hvd: Horovod detection and the horovodrun command line; a real 2-rank gloo run when built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cascade import hvd

CHECK = Path(__file__).with_name("hvd_allreduce_check.py")


def _fake_horovod(root: Path, *, extension: bool = True, built_for: str | None = None) -> None:
    """A `horovod` package in `root` shaped like an installed one (never imported)."""
    (root / "horovod" / "torch").mkdir(parents=True)
    (root / "horovod" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    if extension:
        (root / "horovod" / "torch" / "mpi_lib_v2.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    if built_for is not None:
        (root / "horovod" / "metadata.json").write_text(json.dumps({"pytorch": built_for, "dummy": "none"}))


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`tmp_path` first on sys.path, with any imported horovod forgotten for this test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "horovod" or m.startswith("horovod.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_available_when_built_for_the_installed_torch(fake_site: Path):
    import torch  # only to learn the version the check must find without importing

    _fake_horovod(fake_site, built_for=torch.__version__)
    assert hvd.horovod_unavailable_reason() is None
    assert hvd.horovod_available()
    assert "horovod" not in sys.modules  # checking must not import it


def test_not_installed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hvd.importlib.util, "find_spec", lambda name: None)
    assert not hvd.horovod_available()
    assert hvd.horovod_unavailable_reason() == "horovod not installed (make horovod)"


def test_unavailable_without_the_torch_extension(fake_site: Path):
    _fake_horovod(fake_site, extension=False)
    assert not hvd.horovod_available()
    assert "no PyTorch extension" in hvd.horovod_unavailable_reason()


def test_torch_version_keeps_the_local_label(fake_site: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # so the fake below is what is found
    (fake_site / "torch").mkdir()
    (fake_site / "torch" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (fake_site / "torch" / "version.py").write_text("__version__ = '9.1.0+cu999'\ncuda = '99.9'\n")
    _fake_horovod(fake_site, built_for="9.1.0+cpu")
    reason = hvd.horovod_unavailable_reason()
    assert reason is not None and "built for torch 9.1.0+cpu but torch 9.1.0+cu999" in reason


def test_unavailable_when_built_for_another_torch(fake_site: Path):
    _fake_horovod(fake_site, built_for="1.13.1")
    reason = hvd.horovod_unavailable_reason()
    assert reason is not None and "built for torch 1.13.1" in reason and "make horovod" in reason


def test_horovodrun_command_gloo_by_default():
    cmd = hvd.horovodrun_command(2, [sys.executable, "train.py", "--steps", 3])
    assert Path(cmd[0]).name == "horovodrun"
    assert cmd[1:] == ["-np", "2", "--gloo", sys.executable, "train.py", "--steps", "3"]


def test_horovodrun_command_hosts_and_mpi():
    cmd = hvd.horovodrun_command(8, ["python", "x.py"], controller="mpi", hosts="a:4,b:4")
    assert cmd[1:] == ["-np", "8", "-H", "a:4,b:4", "--mpi", "python", "x.py"]


def test_horovodrun_beside_the_interpreter_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "horovodrun").write_text("#!/bin/sh\n")
    monkeypatch.setattr(hvd.sys, "executable", str(tmp_path / "python"))
    assert hvd.horovodrun_command(1, ["python", "x.py"])[0] == str(tmp_path / "horovodrun")


@pytest.mark.parametrize(
    ("np", "args", "kw", "message"),
    [
        (0, ["python", "x.py"], {}, "np must be >= 1"),
        (2, [], {}, "script_args is empty"),
        (2, ["python", "x.py"], {"controller": "nccl"}, "unknown controller 'nccl'"),
    ],
)
def test_horovodrun_command_rejects(np: int, args: list[str], kw: dict, message: str):
    with pytest.raises(ValueError, match=message):
        hvd.horovodrun_command(np, args, **kw)


@pytest.mark.slow
def test_two_gloo_ranks_allreduce_and_take_one_data_parallel_step(tmp_path: Path):
    if not hvd.horovod_available():
        pytest.skip(hvd.horovod_unavailable_reason())
    cmd = hvd.horovodrun_command(2, [sys.executable, str(CHECK), str(tmp_path)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(ranks):
        assert (res["rank"], res["size"]) == (r, 2)
        assert res["rank_mean"] == pytest.approx(0.5) and res["rank_sum"] == pytest.approx(1.0)
        # averaged gradients of equal shards == the gradient of the whole batch
        assert res["stepped"] == pytest.approx(res["reference"], abs=1e-6)
        assert res["stepped"] != pytest.approx(res["initial"], abs=1e-6)  # the step moved them
    # rank 1 initialised differently; broadcast_parameters made it rank 0's, and it stays in sync
    assert ranks[1]["initial"] == ranks[0]["initial"]
    assert ranks[1]["stepped"] == ranks[0]["stepped"]
