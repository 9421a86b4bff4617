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

    # Pinned (base version 3 with its sample mix and light weight, generator /3): an accidental
    # change of the key would silently retrain every cached base; a deliberate one updates this.
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/3")
    assert pretrain.base_key(TrialConfig()) == "d755c3dfc1e9"
    # The recipe's constants are in it: a changed mix is a new base even without a version bump.
    monkeypatch.setattr(pretrain, "CLEAN_FRACTION", 0.2)
    assert pretrain.base_key(TrialConfig()) != "d755c3dfc1e9"
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


def test_base_json_records_the_base_against_identity_and_its_second_pass(tmp_path):
    import torch

    from cascade.data.testset import PairedTestSet, ensure_test_data
    from cascade.evaluate import predict
    from cascade.model import CascadedFlareRemover

    cfg = cfg_for(tmp_path)
    path = pretrain.ensure_base(cfg)
    quality = json.loads((path.parent / "base.json").read_text())["quality"]
    assert set(quality) == {"test_set", "identity", "base", "deflares", "second_pass", "gap",
                            "idempotent"}
    assert quality["identity"]["n_images"] == cfg.n_test == quality["base"]["n_images"]
    assert quality["deflares"] is False  # two training steps
    # The second pass is the control trial's model: the cascade at 0 steps built from base.pth.
    testset = PairedTestSet(ensure_test_data(cfg))
    with torch.no_grad():
        control = pretrain.deflare_scores((p, g, m) for _, p, g, m in predict(
            CascadedFlareRemover.from_checkpoint(path), testset, torch.device("cpu")))
    assert control == quality["second_pass"]
    for metric in ("psnr_entire", "ssim_entire"):
        assert quality["gap"][metric] == quality["base"][metric] - quality["second_pass"][metric]
    assert "a second pass (the cascade at 0 steps) costs" in pretrain.quality_text(quality)


def test_second_pass_gap_bounds():
    base = {"psnr_entire": 24.0, "ssim_entire": 0.700}
    assert pretrain.second_pass_gap(base, {"psnr_entire": 23.8, "ssim_entire": 0.697}) == {
        "gap": {"psnr_entire": pytest.approx(0.2), "ssim_entire": pytest.approx(0.003)},
        "idempotent": True}
    assert pretrain.second_pass_gap(base, {"psnr_entire": 24.5, "ssim_entire": 0.71})["idempotent"]
    # Either metric past its bound fails it.
    assert not pretrain.second_pass_gap(base, {"psnr_entire": 23.6, "ssim_entire": 0.7})["idempotent"]
    assert not pretrain.second_pass_gap(base, {"psnr_entire": 24.0, "ssim_entire": 0.69})["idempotent"]


def test_sample_kinds_are_a_function_of_the_index_with_the_configured_shares():
    kinds = pretrain.sample_kinds(range(2000), 0.3, 0.1)
    assert pretrain.sample_kinds(range(700, 800), 0.3, 0.1) == kinds[700:800]  # a resumed build
    # The golden-ratio rotation's discrepancy is below 3/m over any m >= 10 consecutive indices
    # (three-gap theorem: its points split [0, 1) into gaps within a factor ~2.6 of 1/m), so every
    # window of 100 samples holds each share to within 3 samples; the whole run to within 1 %.
    for start in range(0, 1900, 100):
        window = kinds[start:start + 100]
        assert abs(window.count("self") - 30) <= 3 and abs(window.count("clean") - 10) <= 3
    assert kinds.count("self") / 2000 == pytest.approx(0.3, abs=0.01)
    assert kinds.count("clean") / 2000 == pytest.approx(0.1, abs=0.01)
    assert set(pretrain.sample_kinds(range(50), 0.0, 0.0)) == {"flare"}


def test_mix_batch_feeds_the_network_its_own_output_and_the_ground_truth():
    import torch
    from torch import nn

    class Halve(nn.Module):
        """6 channels: the input halved, then ones; records the mode it ran in."""

        def __init__(self) -> None:
            super().__init__()
            self.modes: list[bool] = []

        def forward(self, x):
            self.modes.append(self.training)
            return torch.cat([x / 2, torch.ones_like(x)], dim=1)

    model = Halve().train()
    inp, gt = torch.full((3, 3, 4, 4), 0.8), torch.full((3, 3, 4, 4), 0.1)
    flare = torch.full((3, 3, 4, 4), 0.5)
    new_inp, new_gt, new_flare = pretrain.mix_batch(model, inp, gt, flare, ["flare", "self", "clean"])
    assert model.modes == [False] and model.training  # eval mode for the first pass, then back
    assert torch.equal(new_inp[0], inp[0]) and torch.equal(new_flare[0], flare[0])
    assert torch.allclose(new_inp[1], torch.tensor(0.4)) and torch.allclose(new_flare[1], torch.tensor(0.3))
    assert torch.equal(new_inp[2], gt[2]) and torch.equal(new_flare[2], torch.zeros(3, 4, 4))
    assert torch.equal(new_gt, gt) and torch.equal(inp, torch.full((3, 3, 4, 4), 0.8))  # not in place


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


def test_base_loss_weighs_the_light_sources():
    import torch

    gt = torch.zeros(1, 3, 2, 2)
    out = torch.zeros(1, 6, 2, 2)
    out[0, :3, 0, 0] = 1.0  # wrong by 1 on the light-source pixel only
    light = torch.zeros(1, 2, 2, dtype=torch.bool)
    light[0, 0, 0] = True
    flare = torch.zeros(1, 3, 2, 2)
    assert float(pretrain.base_loss(out, gt, flare)) == pytest.approx(0.25)  # plain L1: 1 of 4
    # weights 11, 1, 1, 1 (mean 3.5): 11 / 4 / 3.5
    assert float(pretrain.base_loss(out, gt, flare, light, 10.0)) == pytest.approx(11 / 14)
    assert float(pretrain.base_loss(out, gt, flare, light, 0.0)) == pytest.approx(0.25)
    out[0, :3, 0, 0], out[0, :3, 1, 1] = 0.0, 1.0  # the same error off the light source
    assert float(pretrain.base_loss(out, gt, flare, light, 10.0)) == pytest.approx(1 / 14)


def test_train_base_mixes_its_own_outputs_and_clean_inputs_and_weighs_the_lights(tmp_path, monkeypatch):
    import torch

    calls, losses = [], []
    mix, loss = pretrain.mix_batch, pretrain.base_loss

    def spy_mix(model, inp, gt, flare, kinds):
        calls.append(kinds)
        return mix(model, inp, gt, flare, kinds)

    def spy_loss(out, gt, flare, light=None, light_weight=0.0):
        losses.append((None if light is None else light.dtype, light_weight))
        return loss(out, gt, flare, light, light_weight)

    monkeypatch.setattr(pretrain, "mix_batch", spy_mix)
    monkeypatch.setattr(pretrain, "base_loss", spy_loss)
    pretrain.ensure_base(cfg_for(tmp_path))  # 2 steps of 2 samples: indices 0-1, then 2-3
    assert calls == [pretrain.sample_kinds(range(0, 2)), pretrain.sample_kinds(range(2, 4))]
    assert calls == [["self", "flare"], ["clean", "flare"]]  # frac(n x 0.618) for n = 0..3
    assert losses == [(torch.bool, pretrain.LIGHT_WEIGHT)] * 2


def test_a_cached_base_logs_its_quality_once_per_process(tmp_path, monkeypatch, caplog):
    cfg = cfg_for(tmp_path)
    with caplog.at_level("INFO", logger="cascade.pretrain"):
        pretrain.ensure_base(cfg)  # built here: train_base logs its quality
        pretrain.ensure_base(cfg.replace(seed=1))
        assert sum("second pass" in r.message for r in caplog.records) == 1
        assert not any("(cached)" in r.message for r in caplog.records)
        monkeypatch.setattr(pretrain, "_LOGGED", set())  # another process (a trial, a later sweep)
        caplog.clear()
        for seed in range(3):  # a sweep's prepare step calls ensure_base once per config
            pretrain.ensure_base(cfg.replace(seed=seed))
    cached = [r.message for r in caplog.records]
    assert len(cached) == 1 and "(cached): vs identity" in cached[0] and "second pass" in cached[0]
