"""The stream cache: a trial's results are bit-identical with and without it; shards are built
once, read back with their values and strides, rebuilt when missing, short or corrupt, shared by
trials that run at the same time; its key covers what the values depend on and no path; a sweep
passes its folder to the trials."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_flare7k import _tree

from cascade import stream_cache as SC
from cascade import train as T
from cascade.config import TrialConfig
from cascade.data import batches as B
from cascade.data import synthetic
from cascade.losses import CascadeLoss, cascade_loss, target_features, target_kind
from cascade.uformer import Uformer

ROOT = Path(__file__).resolve().parents[1]
# timm's test_vit (random weights): a ViT like the paper's encoder, at a fraction of the cost.
TINY = dict(embed_dim=8, depth=1, base_steps=2, crop=32, batch_size=2, n_test=2, test_size=32,
            encoder="timm:test_vit", encoder_pretrained=False, eval_workers=0, n_samples=1,
            log_every=2, checkpoint_every=2, steps=3, momentum=0.9)
KINDS = {"pn": (0.6, 1e-3), "p": (1.0, 1e-3), None: (1.0, 0.0)}  # target_kind -> (lambda_, delta)
# "pn" (the triplet cells, 9 of the paper's 11) runs in the fast suite, the other two with `slow`.
KIND_RUNS = [pytest.param(kind, marks=() if kind == "pn" else pytest.mark.slow) for kind in KINDS]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def two_step_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of 2 steps: 3-step trials have a full shard and a short last one."""
    monkeypatch.setattr(SC, "SHARD_STEPS", 2)


def tiny(cache: str, **changes: object) -> TrialConfig:
    return TrialConfig.from_dict({**TINY, "base_cache": cache, **changes})


def _run(cfg: TrialConfig, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """train() with checkpoints in `folder`: (result, the anchor's final weights)."""
    result = T.train(cfg, checkpoint_dir=folder)
    return result, torch.load(folder / "last.pt", weights_only=True)["model"]


def _assert_same_run(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ra, wa), (rb, wb) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for key in ("final_loss", "final_reg", "final_perceptual", "final_triplet", "psnr_entire",
                "ssim_entire", "d_pn"):
        assert ra[key] == rb[key], key


# -- a trial with the cache is a trial without it -----------------------------------------------------


@pytest.mark.parametrize("kind", KIND_RUNS, ids=str)
def test_results_are_bit_identical_to_computing_every_step(cache, tmp_path, two_step_shards, kind):
    lambda_, delta = KINDS[kind]
    cfg = tiny(cache, lambda_=lambda_, delta=delta, stream_cache_dir=str(tmp_path / "stream"))
    off = _run(cfg.replace(stream_cache=False), tmp_path / "off")
    built = _run(cfg, tmp_path / "built")  # the first trial of the stream computes and writes
    read = _run(cfg, tmp_path / "read")  # the next one reads everything
    _assert_same_run(off, built)
    _assert_same_run(off, read)
    assert off[0]["stream_cache"] is None
    assert built[0]["stream_cache"]["built_steps"] == 3 and built[0]["stream_cache"]["read_steps"] == 0
    assert read[0]["stream_cache"]["built_steps"] == 0 and read[0]["stream_cache"]["read_steps"] == 3
    folder = Path(built[0]["stream_cache"]["dir"])
    assert folder.parent == tmp_path / "stream" and folder == Path(read[0]["stream_cache"]["dir"])
    assert sorted(p.name for p in (folder / "r0of1").glob("*.stream.pt")) == [
        "0000000.stream.pt", "0000002.stream.pt"]
    assert len(list((folder / "r0of1").glob("*.f-*.pt"))) == (0 if kind is None else 2)
    assert json.loads((folder / "spec.json").read_text())["data"]["batch_size"] == 2


def test_a_lambda_one_trial_reuses_the_stream_part_of_a_triplet_trial(cache, tmp_path, two_step_shards):
    """p and n are shared across target kinds; f(p) alone is computed from the stored ones and
    equals what a trial without the cache computes."""
    stream = str(tmp_path / "stream")
    T.train(tiny(cache, lambda_=0.4, stream_cache_dir=stream))
    (folder,) = (tmp_path / "stream").iterdir()
    parts = sorted((folder / "r0of1").glob("*.stream.pt"))
    written = {p: p.stat().st_mtime_ns for p in parts}
    cfg = tiny(cache, lambda_=1.0, delta=1e-3, stream_cache_dir=stream)
    on = _run(cfg, tmp_path / "on")
    _assert_same_run(_run(cfg.replace(stream_cache=False), tmp_path / "off"), on)
    assert {p: p.stat().st_mtime_ns for p in parts} == written  # p and n were read, not rebuilt
    assert len(list((folder / "r0of1").glob("0000000.f-*.pt"))) == 2  # "pn" and "p" embeddings
    assert len(list(folder.glob("features-*.json"))) == 2


# -- the loss entry point --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS), ids=str)
def test_precomputed_targets_give_the_same_terms(kind):
    torch.manual_seed(0)
    lambda_, delta = KINDS[kind]
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    a, p, n = (torch.rand(2, 3, 8, 8) for _ in range(3))
    a.requires_grad_(True)
    assert target_kind(lambda_, delta) == kind
    targets = target_features(encoder, p, n, lambda_, delta)
    assert (targets is None) == (kind is None)
    if kind is not None:
        assert targets.shape == ((4 if kind == "pn" else 2), 5) and not targets.requires_grad
    loss = CascadeLoss(encoder, 2, lambda_, delta, margin=0.05)
    plain, given = loss(a, p, n), loss(a, p, n, loss.targets(p, n))
    for name in plain._fields:
        assert torch.equal(getattr(plain, name), getattr(given, name)), name
    if kind is not None:
        with pytest.raises(ValueError, match="expected .* rows"):
            cascade_loss(a, p, n, encoder, 2, lambda_, delta, targets=targets[:1])


# -- shards: a fake frozen half, no networks -----------------------------------------------------------


class FakeFrozen:
    """n = the first 3 channels of a 6-channel output (a strided view, as a Uformer's), optionally
    channels_last; targets = f(p) and f(n) rows ("pn")."""

    kind = "pn"

    def __init__(self, channels_last: bool = False) -> None:
        self.channels_last = channels_last

    def __call__(self, inp: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.cat([inp * 0.5, inp.flip(1)], 1)  # (b, 6, S, S)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        neg = out[:, :3]
        return neg, self.targets(gt, neg)

    def targets(self, gt: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return torch.cat([gt, neg.float()]).flatten(1)[:, :5] * 2


def _batches(log: list[int]):
    def batches(steps: range):
        for s in steps:
            log.append(s)
            g = torch.Generator().manual_seed(s)
            inp, gt = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
            yield inp, gt, gt
    return batches


def _cache(root: Path, log: list[int], frozen: FakeFrozen | None = None) -> SC.StreamCache:
    return SC.StreamCache(root, {"a": "spec"}, {"kind": "pn"}, frozen or FakeFrozen(),
                          _batches(log), torch.device("cpu"))


def _reference(start: int, stop: int, frozen: FakeFrozen | None = None) -> list[tuple]:
    frozen = frozen or FakeFrozen()
    return [(gt, *frozen(inp, gt)) for inp, gt, _ in _batches([])(range(start, stop))]


def _assert_steps(got: list[SC.StreamStep], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for step, (gt, neg, targets) in zip(got, want):
        for have, expected in ((step.gt, gt), (step.negative, neg), (step.targets, targets)):
            assert torch.equal(have, expected) and have.stride() == expected.stride()
            assert have.dtype == expected.dtype


@pytest.mark.parametrize("channels_last", [False, True])
def test_shards_give_back_values_and_strides_and_are_built_once(tmp_path, two_step_shards,
                                                                channels_last):
    frozen = FakeFrozen(channels_last)
    log: list[int] = []
    first = _cache(tmp_path, log, frozen)
    _assert_steps(list(first.steps(0, 5)), _reference(0, 5, frozen))
    assert log == [0, 1, 2, 3, 4] and first.stats()["built_steps"] == 5
    assert _reference(0, 1, frozen)[0][1].stride() == ((96, 1, 24, 6) if channels_last
                                                      else (96, 16, 4, 1))
    second = _cache(tmp_path, log, frozen)
    _assert_steps(list(second.steps(3, 5)), _reference(3, 5, frozen))  # from the middle of a shard
    assert log == [0, 1, 2, 3, 4] and second.stats() == {
        "dir": str(first.folder), "built_steps": 0, "read_steps": 3}  # shard [2, 4) and [4, 5)


def test_missing_short_and_corrupt_shards_are_rebuilt(tmp_path, two_step_shards, caplog):
    log: list[int] = []
    cache = _cache(tmp_path, log)
    list(cache.steps(0, 5))  # shards [0, 2), [2, 4) and a short [4, 5)
    stream0 = cache._stream_path(0)
    blob = bytearray(stream0.read_bytes())
    blob[-10] ^= 0xFF  # one flipped byte
    stream0.write_bytes(bytes(blob))
    cache._features_path(1).unlink()
    log.clear()
    with caplog.at_level(logging.WARNING, logger="cascade.stream_cache"):
        again = _cache(tmp_path, log)
        _assert_steps(list(again.steps(0, 6)), _reference(0, 6))
    assert f"{stream0} is corrupt" in caplog.text
    # shard 0 corrupt: rebuilt; shard 1: its embeddings from the stored p and n (no data needed);
    # shard 2 held 1 step of the 2 this trial needs: rebuilt longer
    assert log == [0, 1, 4, 5]
    assert again.stats()["built_steps"] == 6 and again.stats()["read_steps"] == 0
    log.clear()
    third = _cache(tmp_path, log)
    _assert_steps(list(third.steps(0, 6)), _reference(0, 6))
    assert log == [] and third.stats()["read_steps"] == 6


def test_a_shard_another_trial_is_building_makes_this_one_build_the_next_first(tmp_path,
                                                                             two_step_shards):
    log: list[int] = []
    cache = _cache(tmp_path, log)
    got: list[SC.StreamStep] = []
    with SC.file_lock(cache._lock_path(0)):  # "another trial" is building shard 0
        worker = threading.Thread(target=lambda: got.extend(cache.steps(0, 6)))
        worker.start()
        deadline = time.time() + 60
        while not (cache.present(1) and cache.present(2)) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert worker.is_alive()  # shards 1 and 2 built, now waiting for shard 0
        assert log == [2, 3, 4, 5]
    worker.join(60)
    assert log == [2, 3, 4, 5, 0, 1]  # the lock's holder died without writing it: built here
    _assert_steps(got, _reference(0, 6))
    assert cache.stats()["built_steps"] == 6


def test_a_full_disk_or_an_unwritable_folder_changes_nothing_but_the_files(tmp_path, two_step_shards,
                                                                         monkeypatch, caplog):
    log: list[int] = []
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="cascade.stream_cache"):
        m.setattr(SC, "MIN_FREE_BYTES", 1 << 62)
        _assert_steps(list(_cache(tmp_path / "full", log).steps(0, 5)), _reference(0, 5))
    assert log == [0, 1, 2, 3, 4] and not list((tmp_path / "full").rglob("*.pt"))
    assert caplog.text.count("must stay free") == 1  # said once, not per shard

    def refuse(*args: object, **kwargs: object):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(SC, "file_lock", refuse)  # e.g. a read-only folder
    log.clear()
    _assert_steps(list(_cache(tmp_path / "ro", log).steps(0, 3)), _reference(0, 3))
    assert log == [0, 1, 2] and not list((tmp_path / "ro").rglob("*.pt"))


# -- the key ----------------------------------------------------------------------------------------


def _keys(cfg: TrialConfig, weights_seed: int = 0, bf16: bool = False) -> tuple[str, str | None]:
    """(stream key, features key) of a config, with a tiny negative and encoder of known weights."""
    from cascade.encoders import build_encoder

    torch.manual_seed(weights_seed)
    negative = Uformer(img_size=32, embed_dim=8, depths=(1,) * 9)
    encoder = build_encoder(cfg.encoder, cfg.encoder_pretrained, features=cfg.encoder_features)
    spec = SC.stream_spec(cfg, B.build_pairs(cfg), negative, torch.device("cpu"), bf16)
    features = SC.features_spec(cfg, encoder, target_kind(cfg.lambda_, cfg.delta))
    return SC.digest(spec, 16), SC.digest(features, 12) if features else None


def test_the_key_covers_what_the_values_depend_on_and_nothing_else(cache):
    cfg = tiny(cache)
    stream, features = _keys(cfg)
    for change in ({"seed": 1}, {"crop": 48}, {"batch_size": 4}, {"random_erasing": 0.5},
                   {"workers": 2, "backend": "ddp"}, {"channels_last": True}):
        assert _keys(cfg.replace(**change))[0] != stream, change
    assert _keys(cfg, weights_seed=1)[0] != stream  # other negative (and encoder) weights
    assert _keys(cfg, bf16=True)[0] != stream  # bf16 autocast (as applied: CUDA only)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # CPU reductions split over threads
        assert _keys(cfg)[0] != stream
    finally:
        torch.set_num_threads(threads)
    for change in ({"encoder_features": "tokens"}, {"lambda_": 1.0}, {"encoder": "small_cpu"}):
        assert _keys(cfg.replace(**change))[1] != features, change
    assert _keys(cfg, weights_seed=1)[1] != features
    assert _keys(cfg.replace(lambda_=1.0, delta=0.0))[1] is None  # no encoder term, no embeddings
    # Trial settings that leave the frozen half alone share the cache, paths included.
    same = {"k": 1, "lambda_": 0.2, "delta": 0.5, "margin": 1.0, "reduction": "sum", "lr": 0.1,
            "steps": 99, "optimizer": "adam", "log_every": 1, "stream_cache_dir": "/elsewhere",
            "base_cache": "/other", "n_test": 5, "protocol": "flare7k", "compile": True}
    assert _keys(cfg.replace(**same)) == (stream, features)


def test_flare7k_files_are_keyed_by_content_not_by_where_they_are(cache, tmp_path):
    data, backgrounds = _tree(tmp_path / "a")
    cfg = tiny(cache, data=str(data), backgrounds=str(backgrounds))
    key = _keys(cfg)[0]
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    assert _keys(cfg.replace(data=str(moved / data.name), backgrounds=str(moved / "bg")))[0] == key
    first = sorted(backgrounds.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # another file (size) under the same name
    assert _keys(cfg)[0] != key


# -- the sweep passes its folder -------------------------------------------------------------------


def test_a_sweep_trial_gets_the_sweeps_stream_folder_and_keeps_its_id(tmp_path):
    from orchestrator.record import SweepRecord
    from orchestrator.space import trial_id
    from orchestrator.trial import with_stream_cache

    record = SweepRecord(tmp_path / "sweep")
    cfg = TrialConfig.from_dict({"encoder": "small_cpu", "encoder_pretrained": False})
    passed = with_stream_cache(cfg, record)
    assert passed.stream_cache_dir == str(tmp_path / "sweep" / "stream")
    assert trial_id(passed) == trial_id(cfg)  # a runtime field: the same trial
    own = cfg.replace(stream_cache_dir=str(tmp_path / "mine"))
    assert with_stream_cache(own, record) is own
    for cfg_off in (cfg.replace(stream_cache=False), cfg.replace(kind="reference")):
        assert with_stream_cache(cfg_off, record).stream_cache_dir is None


# -- slow: Flare7K data with loader workers, DDP ranks, trials at the same time ------------------------


@pytest.mark.slow
def test_flare7k_pairs_with_loader_workers_are_bit_identical(cache, tmp_path, two_step_shards):
    data, backgrounds = _tree(tmp_path / "tree")
    synthetic.generate_dataset(data / "test_data" / "real", n=2, size=32, seed=0)
    cfg = tiny(cache, data=str(data), backgrounds=str(backgrounds), num_workers=1,
               stream_cache_dir=str(tmp_path / "stream"), random_erasing=0.5)
    off = _run(cfg.replace(stream_cache=False), tmp_path / "off")
    _assert_same_run(off, _run(cfg, tmp_path / "built"))
    read = _run(cfg.replace(num_workers=0), tmp_path / "read")
    _assert_same_run(off, read)
    assert read[0]["data_loader"] == "flare7kpp" and read[0]["stream_cache"]["read_steps"] == 3


@pytest.mark.slow
def test_ddp_ranks_keep_their_own_shards_and_match_without_the_cache(cache, tmp_path):
    cfg = tiny(cache, backend="ddp", workers=2, steps=2, stream_cache_dir=str(tmp_path / "stream"))
    off = _run(cfg.replace(stream_cache=False), tmp_path / "off")
    _assert_same_run(off, _run(cfg, tmp_path / "built"))
    _assert_same_run(off, _run(cfg, tmp_path / "read"))
    (folder,) = (tmp_path / "stream").iterdir()
    assert sorted(p.name for p in folder.glob("r*")) == ["r0of2", "r1of2"]


@pytest.mark.slow
def test_trials_running_at_the_same_time_build_each_shard_once(cache, tmp_path):
    """Two processes, one stream of 2 shards (SHARD_STEPS = 10): every shard is built by one of
    them, and both end as a trial without the cache does."""
    cfg = tiny(cache, steps=20, log_every=10, checkpoint_every=20,
               stream_cache_dir=str(tmp_path / "stream"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    procs = [subprocess.Popen([sys.executable, "-m", "cascade.train", "--config",
                               str(tmp_path / "cfg.json"), "--output-dir", str(tmp_path / name)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("a", "b")]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    assert sum(r["stream_cache"]["built_steps"] for r in results) == 20
    assert all(r["stream_cache"]["built_steps"] + r["stream_cache"]["read_steps"] == 20
               for r in results)
    off = T.train(cfg.replace(stream_cache=False))
    for r in results:
        for key in ("final_loss", "psnr_entire", "d_pn"):
            assert r[key] == off[key], key
