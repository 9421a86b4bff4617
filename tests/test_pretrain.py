"""cascade.pretrain: the procedural base's cache key, reuse, one build under concurrency, given
checkpoints."""

from __future__ import annotations

import threading
import time

import pytest

from cascade import pretrain
from cascade.config import TrialConfig
from cascade.errors import UserError


def cfg_for(tmp_path, **changes) -> TrialConfig:
    return TrialConfig.from_dict({"base_cache": str(tmp_path), "embed_dim": 8, "depth": 1, "crop": 32,
                                  "batch_size": 2, "base_steps": 2, "n_test": 2, "test_size": 32,
                                  **changes})


def test_base_key_ignores_trial_fields_and_follows_base_fields(tmp_path):
    cfg = cfg_for(tmp_path)
    assert pretrain.base_key(cfg) == pretrain.base_key(cfg.replace(k=1, lambda_=0.2, seed=7, steps=3))
    assert pretrain.base_key(cfg) != pretrain.base_key(cfg.replace(base_steps=3))
    assert pretrain.base_key(cfg) != pretrain.base_key(cfg.replace(embed_dim=16))


def test_base_key_is_unchanged_by_the_move_out_of_cascade_base(monkeypatch):
    import cascade.data.synthetic as synthetic

    # Computed with cascade.base.base_key before the move: cached bases on disk stay valid.
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/2")
    assert pretrain.base_key(TrialConfig()) == "aa1615bbca17"


def test_concurrent_trials_build_the_base_once(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, folder):
        calls.append(folder)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "base.pth").write_bytes(b"weights")

    monkeypatch.setattr(pretrain, "train_base", fake_train)
    cfg = cfg_for(tmp_path)
    paths = []
    threads = [threading.Thread(target=lambda s=s: paths.append(pretrain.ensure_base(cfg.replace(seed=s))))
               for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1
    assert paths[0] == tmp_path.resolve() / "bases" / pretrain.base_key(cfg) / "base.pth"


def test_procedural_base_trains_loads_and_is_reused(tmp_path):
    from cascade.uformer import load_checkpoint

    cfg = cfg_for(tmp_path)
    path = pretrain.ensure_base(cfg)
    model = load_checkpoint(path)
    assert model.arch["embed_dim"] == 8 and model.arch["depths"] == [1] * 9
    assert model.arch["output_ch"] == cfg.output_ch
    assert (path.parent / "base.json").is_file() and not (path.parent / "checkpoints").exists()
    mtime = path.stat().st_mtime_ns
    assert pretrain.ensure_base(cfg.replace(seed=5)) == path and path.stat().st_mtime_ns == mtime


def test_a_given_checkpoint_is_used_as_is_or_refused_clearly(tmp_path):
    weights = tmp_path / "net.pth"
    weights.write_bytes(b"x")
    assert pretrain.ensure_base(cfg_for(tmp_path, checkpoint=str(weights), base_kind="flare7kpp")) == weights.resolve()
    with pytest.raises(UserError, match="no such file"):
        pretrain.ensure_base(cfg_for(tmp_path, checkpoint=str(tmp_path / "missing.pth"), base_kind="flare7kpp"))


def test_a_new_data_generator_version_invalidates_the_base(tmp_path, monkeypatch):
    import cascade.data.synthetic as synthetic

    cfg = cfg_for(tmp_path)
    before = pretrain.base_key(cfg)
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/999", raising=False)
    assert pretrain.base_key(cfg) != before
