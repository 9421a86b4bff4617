"""cascade.hvd: Horovod detection and the horovodrun command line; when `make horovod` has built it,
real 2-rank gloo runs: collectives, and trials through `backend: horovod` (cascade.distributed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cascade import distributed, hvd
from cascade import train as T
from cascade.config import TrialConfig
from cascade.errors import UserError
from cascade.model import CascadedFlareRemover
from cascade.pretrain import ensure_base

CHECK = Path(__file__).with_name("hvd_allreduce_check.py")
needs_horovod = pytest.mark.skipif(not hvd.horovod_available(),
                                   reason=hvd.horovod_unavailable_reason() or "")

# tests/test_train.py's tiny trial; lambda_=1, delta=0: L_REG only (no encoder), so the loss is a
# mean over the batch and averaged shard gradients equal the whole batch's. Adam moves the weights
# visibly in 4 steps and has state that a broadcast could get wrong.
TINY = dict(embed_dim=8, depth=1, base_steps=2, crop=32, batch_size=2, n_test=2, test_size=32,
            encoder="small_cpu", encoder_pretrained=False, eval_workers=0, n_samples=1,
            log_every=2, checkpoint_every=2, steps=4, lambda_=1.0, delta=0.0,
            optimizer="adam", lr=3e-3)


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


# -- `backend: horovod` in the trainer (cascade.distributed) ------------------------------------------


def _must_not_run(dp: distributed.DataParallel, report) -> None:
    raise AssertionError("launched although horovod is unusable")


@pytest.mark.parametrize("workers", [1, 2])
def test_backend_horovod_without_horovod_is_one_user_error(monkeypatch: pytest.MonkeyPatch, workers: int):
    monkeypatch.setattr(hvd, "horovod_unavailable_reason", lambda: hvd.NOT_INSTALLED)
    with pytest.raises(UserError) as info:
        distributed.launch("horovod", workers, _must_not_run, ())
    assert str(info.value) == "horovod is not installed (run `make horovod`)"
    monkeypatch.setattr(hvd, "horovod_unavailable_reason", lambda: "horovod was built for torch 1.0")
    with pytest.raises(UserError, match=r"^horovod is not usable: horovod was built for torch 1\.0$"):
        distributed.launch("horovod", workers, _must_not_run, ())


def _stop_on_rank_1_after_step_3(dp: distributed.DataParallel, report, cfg: TrialConfig,
                                  base_path: str, checkpoint_dir: str) -> dict | None:
    """The trainer's rank body; rank 1 raises a UserError after step 3, while rank 0 goes on into
    step 4's gradient allreduce and would wait there forever if horovodrun did not end it."""
    original = T._Loop.after_step

    def after_step(self, done: int, *args) -> None:
        original(self, done, *args)
        if dp.rank == 1 and done == 3:
            raise UserError("bad input seen on rank 1 at step 3")

    T._Loop.after_step = after_step
    try:
        return T._train_rank(dp, report, cfg, base_path, checkpoint_dir)
    finally:
        T._Loop.after_step = original


def _anchor_without_stochastic_depth(dp: distributed.DataParallel, report, cfg: TrialConfig,
                                     base_path: str) -> dict | None:
    """The trainer's rank body (`cascade.train._train_rank`) with stochastic depth off: its masks
    are drawn per rank, the one thing a single process cannot reproduce. Returns rank 0's trained
    anchor (flat) and the largest difference of any of its weights across ranks."""
    built: list[CascadedFlareRemover] = []
    original = CascadedFlareRemover.from_checkpoint.__func__

    def without_drop_path(cls, path, **overrides):
        built.append(original(cls, path, **{**overrides, "drop_path_rate": 0.0}))
        return built[-1]

    CascadedFlareRemover.from_checkpoint = classmethod(without_drop_path)
    try:
        T._train_rank(dp, report, cfg, base_path, None)
    finally:
        CascadedFlareRemover.from_checkpoint = classmethod(original)
    flat = torch.cat([p.detach().reshape(-1) for p in built[0].anchor.parameters()])
    spread = (dp.all_reduce(flat, op="max") - dp.all_reduce(flat, op="min")).abs().max()
    return {"anchor": flat, "spread": float(spread)} if dp.is_main else None


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _tiny(cache: str, **changes) -> TrialConfig:
    return TrialConfig.from_dict({**TINY, "base_cache": cache, **changes})


def _weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_dir / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def horovod_trial(cache: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list, Path]:
    """One 2-rank Horovod trial of TINY: (result, rank 0's relayed reports, output folder)."""
    if not hvd.horovod_available():
        pytest.skip(hvd.horovod_unavailable_reason())
    out = tmp_path_factory.mktemp("horovod")
    reports: list = []
    result = T.train(_tiny(cache, backend="horovod", workers=2),
                     report=lambda m, c: reports.append((m, c)), output_dir=out)
    return result, reports, out


@pytest.mark.slow
@needs_horovod
def test_horovod_trial_gives_the_results_of_one_process(cache: str, horovod_trial, tmp_path: Path):
    result, reports, out = horovod_trial
    single = T.train(_tiny(cache), output_dir=tmp_path)  # tests/test_train.py: DDP gives these keys
    assert result.keys() == single.keys()
    assert (result["backend"], result["workers"], result["steps"]) == ("horovod", 2, 4)
    # rank 0's progress reports reached this process, each with the checkpoint written before it
    progress = [(m["step"], c) for m, c in reports if "eta_s" in m]
    assert progress == [(2, str(out / "checkpoints")), (4, str(out / "checkpoints"))]
    assert reports[-1][0] == result
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert json.loads((out / "config.json").read_text())["backend"] == "horovod"
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        p.name for p in (tmp_path / "samples").iterdir())
    one, two = pd.read_csv(tmp_path / "per_image.csv"), pd.read_csv(out / "per_image.csv")
    assert one[["image", "region", "metric"]].equals(two[["image", "region", "metric"]])
    # Same global batches, averaged gradients: only stochastic depth differs (as for DDP).
    assert abs(result["psnr_entire"] - single["psnr_entire"]) < 0.5
    assert abs(result["final_loss"] - single["final_loss"]) < 0.1 * single["final_loss"]


@pytest.mark.slow
@needs_horovod
def test_horovod_ranks_agree_and_equal_one_process_on_the_whole_batch(cache: str):
    # SGD with momentum and weight decay: a fresh optimizer broadcast by a zero-gradient step
    # (horovod's broadcast_optimizer_state) would decay the weights once more than one process does.
    cfg = _tiny(cache, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.1)
    base_path = str(ensure_base(cfg))
    single = distributed.launch("none", 1, _anchor_without_stochastic_depth, (cfg, base_path))
    double = distributed.launch("horovod", 2, _anchor_without_stochastic_depth, (cfg, base_path))
    assert double["spread"] == 0.0  # every rank ends with rank 0's weights, bit for bit
    start = torch.cat([p.reshape(-1) for p in CascadedFlareRemover.from_checkpoint(base_path)
                       .anchor.parameters()]).detach()
    moved = (single["anchor"] - start).abs().max().item()
    assert moved > 1e-3
    assert (double["anchor"] - single["anchor"]).abs().max().item() < 1e-3 * moved


@pytest.mark.slow
@needs_horovod
def test_horovod_rank_error_comes_back_typed_and_the_trial_resumes_exactly(cache: str, horovod_trial,
                                                                           tmp_path: Path):
    cfg = _tiny(cache, backend="horovod", workers=2)
    with pytest.raises(UserError, match="rank 1 at step 3"):
        distributed.launch("horovod", 2, _stop_on_rank_1_after_step_3,
                           (cfg, str(ensure_base(cfg)), str(tmp_path)))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    # Resumed under Horovod (optimizer state broadcast from rank 0): ends where the straight run did.
    T.train(cfg, checkpoint_dir=tmp_path)
    straight, resumed = _weights(horovod_trial[2] / "checkpoints"), _weights(tmp_path)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
