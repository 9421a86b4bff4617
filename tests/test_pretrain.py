"""cascade.pretrain: the procedural base's cache key, reuse, one build under concurrency, given
checkpoints."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from cascade import pretrain
from cascade.config import TrialConfig
from cascade.errors import UserError

# The demo's recipe (search_spaces/demo.yaml) at 32 px on 8 test images: ~10 s.
SMALL_DEFLARING_BASE = {"crop": 32, "test_size": 32, "n_test": 8, "base_steps": 150, "base_lr": 2e-3}


def cfg_for(tmp_path, **changes) -> TrialConfig:
    return TrialConfig.from_dict({"base_cache": str(tmp_path), "embed_dim": 8, "depth": 1, "crop": 32,
                                  "batch_size": 2, "base_steps": 2, "n_test": 2, "test_size": 32,
                                  **changes})


def test_base_key_ignores_trial_fields_and_follows_base_fields(tmp_path):
    cfg = cfg_for(tmp_path)
    assert pretrain.base_key(cfg) == pretrain.base_key(cfg.replace(k=1, lambda_=0.2, seed=7, steps=3))
    assert pretrain.base_key(cfg) != pretrain.base_key(cfg.replace(base_steps=3))
    assert pretrain.base_key(cfg) != pretrain.base_key(cfg.replace(embed_dim=16))


def test_base_key_is_pinned(monkeypatch):
    import cascade.data.synthetic as synthetic

    # Pinned (base version 2, generator /3): an accidental change of the key would silently
    # retrain every cached base; a deliberate one updates this value.
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/3")
    assert pretrain.base_key(TrialConfig()) == "f36faa1409db"
    # The test resolution is part of it: the base's crops are cut from frames of that size.
    assert pretrain.base_key(TrialConfig()) != pretrain.base_key(TrialConfig(test_size=256))
    assert pretrain.base_frame(TrialConfig(crop=128, test_size=512)) == 512


def test_the_base_trains_on_crops_of_test_resolution_frames_of_its_own_split(tmp_path, monkeypatch):
    import cascade.data.synthetic as synthetic

    made = []
    real = synthetic.ProceduralPairs

    def spy(*args, **kwargs):
        pairs = real(*args, **kwargs)
        made.append(pairs)
        return pairs

    monkeypatch.setattr(synthetic, "ProceduralPairs", spy)
    cfg = cfg_for(tmp_path, crop=16, test_size=32)
    pretrain.ensure_base(cfg)
    base = [p for p in made if p.split == "base"]
    assert len(base) == 1 and (base[0].size, base[0].frame, base[0].seed) == (16, 32, pretrain.BASE_SEED)
    assert {p.split for p in made} == {"base", "test"}  # and the test set, to score it


def test_deflare_scores_known_values():
    gt = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[:, :8] = (255, 255, 0)  # glare on the left half: "outside" is the right half
    perfect = pretrain.deflare_scores([(gt, gt, mask)])
    assert perfect["psnr_entire"] == np.inf and perfect["ssim_entire"] == pytest.approx(1.0)
    assert perfect["ssim_outside"] == pytest.approx(1.0) and perfect["n_images"] == 1
    off = gt.copy()
    off[:, :8] = 10  # wrong inside the flare region only
    scores = pretrain.deflare_scores([(off, gt, mask)])
    assert scores["psnr_entire"] == pytest.approx(10 * np.log10(255**2 / 50.0))  # MSE 100 on half
    assert scores["psnr_outside"] == np.inf  # right half exact
    both = gt + 10
    scores = pretrain.deflare_scores([(both, gt, mask)])
    assert scores["psnr_outside"] == pytest.approx(10 * np.log10(255**2 / 100.0))


def test_base_json_records_the_base_against_identity(tmp_path):
    cfg = cfg_for(tmp_path)
    path = pretrain.ensure_base(cfg)
    quality = json.loads((path.parent / "base.json").read_text())["quality"]
    assert set(quality) == {"test_set", "identity", "base", "deflares"}
    assert quality["identity"]["n_images"] == cfg.n_test == quality["base"]["n_images"]
    assert quality["deflares"] is False  # two training steps


@pytest.mark.slow
def test_the_base_beats_identity_on_a_small_test_set(tmp_path):
    # A tiny version of the demo's recipe (search_spaces/demo.yaml): seconds, not minutes.
    cfg = cfg_for(tmp_path, **SMALL_DEFLARING_BASE)
    path = pretrain.ensure_base(cfg)
    quality = json.loads((path.parent / "base.json").read_text())["quality"]
    base, identity = quality["base"], quality["identity"]
    assert base["psnr_entire"] >= identity["psnr_entire"] + pretrain.MIN_PSNR_GAIN_DB
    assert base["ssim_entire"] > identity["ssim_entire"]
    assert base["ssim_outside"] >= identity["ssim_outside"]
    assert quality["deflares"] is True


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
