"""Base network and test-set cache: keys, reuse, one build under concurrency, the file lock."""

from __future__ import annotations

import threading
import time

import pytest

from cascade import base
from cascade.config import TrialConfig
from cascade.errors import UserError


def cfg_for(tmp_path, **changes) -> TrialConfig:
    return TrialConfig.from_dict({"base_cache": str(tmp_path), "embed_dim": 8, "depth": 1, "crop": 32,
                                  "batch_size": 2, "base_steps": 2, "n_test": 2, "test_size": 32,
                                  **changes})


def test_base_key_ignores_trial_fields_and_follows_base_fields(tmp_path):
    cfg = cfg_for(tmp_path)
    assert base.base_key(cfg) == base.base_key(cfg.replace(k=1, lambda_=0.2, seed=7, steps=3))
    assert base.base_key(cfg) != base.base_key(cfg.replace(base_steps=3))
    assert base.base_key(cfg) != base.base_key(cfg.replace(embed_dim=16))
    assert base.test_key(cfg) == base.test_key(cfg.replace(seed=3, crop=64))
    assert base.test_key(cfg) != base.test_key(cfg.replace(n_test=3))


def test_concurrent_trials_build_the_base_once(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, folder):
        calls.append(folder)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "base.pth").write_bytes(b"weights")

    monkeypatch.setattr(base, "train_base", fake_train)
    cfg = cfg_for(tmp_path)
    paths = []
    threads = [threading.Thread(target=lambda s=s: paths.append(base.ensure_base(cfg.replace(seed=s))))
               for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1
    assert paths[0] == tmp_path.resolve() / "bases" / base.base_key(cfg) / "base.pth"


def test_file_lock_is_exclusive(tmp_path):
    order = []
    lock = tmp_path / "x.lock"

    def holder():
        with base.file_lock(lock):
            order.append("a in")
            time.sleep(0.3)
            order.append("a out")

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.1)
    with base.file_lock(lock):  # a second open file description: blocks until released
        order.append("b in")
    t.join()
    assert order == ["a in", "a out", "b in"]


def test_procedural_base_trains_loads_and_is_reused(tmp_path):
    from cascade.uformer import load_checkpoint

    cfg = cfg_for(tmp_path)
    path = base.ensure_base(cfg)
    model = load_checkpoint(path)
    assert model.arch["embed_dim"] == 8 and model.arch["depths"] == [1] * 9
    assert model.arch["output_ch"] == cfg.output_ch
    assert (path.parent / "base.json").is_file() and not (path.parent / "checkpoints").exists()
    mtime = path.stat().st_mtime_ns
    assert base.ensure_base(cfg.replace(seed=5)) == path and path.stat().st_mtime_ns == mtime


def test_procedural_test_set_is_built_once_in_the_testset_layout(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    root = base.ensure_test_data(cfg)
    assert sorted(p.name for p in (root / "input").iterdir()) == ["000000.png", "000001.png"]
    assert {p.name for p in root.iterdir()} >= {"input", "gt", "mask"}
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    import cascade.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "generate_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert base.ensure_test_data(cfg.replace(seed=9)) == root


def test_given_paths_are_used_as_is_or_refused_clearly(tmp_path):
    weights = tmp_path / "net.pth"
    weights.write_bytes(b"x")
    assert base.ensure_base(cfg_for(tmp_path, checkpoint=str(weights))) == weights.resolve()
    with pytest.raises(UserError, match="no such file"):
        base.ensure_base(cfg_for(tmp_path, checkpoint=str(tmp_path / "missing.pth")))
    assert base.ensure_test_data(cfg_for(tmp_path, test_data=str(tmp_path))) == tmp_path.resolve()
    with pytest.raises(UserError, match="test_data/real"):
        base.ensure_test_data(cfg_for(tmp_path, data=str(tmp_path), backgrounds=str(tmp_path)))


def test_cache_dir_is_absolute_and_configurable(tmp_path, monkeypatch):
    monkeypatch.delenv("FLARESWEEP_CACHE", raising=False)
    assert base.cache_dir(TrialConfig()).is_absolute()
    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path / "c"))
    assert base.cache_dir(TrialConfig()) == tmp_path / "c"
    assert base.cache_dir(cfg_for(tmp_path)) == tmp_path.resolve()


def test_a_new_data_generator_version_invalidates_the_caches(tmp_path, monkeypatch):
    import cascade.data.synthetic as synthetic

    cfg = cfg_for(tmp_path)
    before = base.base_key(cfg), base.test_key(cfg)
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/999", raising=False)
    after = base.base_key(cfg), base.test_key(cfg)
    assert before[0] != after[0] and before[1] != after[1]
