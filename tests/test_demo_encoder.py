"""cascade.demo_encoder: the trained demo encoder learns something (held-out IoU above its random
initialisation), is built once and cached, and is a frozen PerceptualEncoder like the others."""

from __future__ import annotations

import math

import pytest
import torch

from cascade import demo_encoder
from cascade.encoders import ENCODERS, build_encoder


def test_learned_needs_every_region_well_above_chance():
    chance = {"streak": 0.2, "glare": 0.3, "light": 0.0}
    assert demo_encoder.learned({"streak": 0.6, "glare": 0.7, "light": 0.5}, chance)
    assert not demo_encoder.learned({"streak": 0.6, "glare": 0.7, "light": 0.1}, chance)
    assert not demo_encoder.learned(chance, chance)  # what a random network scores


@pytest.mark.slow
def test_a_few_training_steps_raise_held_out_iou_above_the_random_initialisation():
    torch.manual_seed(0)
    random_iou = demo_encoder.heldout_iou(demo_encoder.FlareSegNet().eval(), n=8, size=64)
    net = demo_encoder.train_segmenter(steps=40, batch=2, size=64)  # same initialisation (seed 0)
    iou = demo_encoder.heldout_iou(net, n=8, size=64)
    for region in ("streak", "glare"):  # the light source, ~0.5 % of the pixels, takes longer
        assert iou[region] > random_iou[region] + 0.2, (iou, random_iou)


def test_held_out_images_are_never_training_samples():
    assert demo_encoder.HELDOUT_START > demo_encoder.STEPS * demo_encoder.BATCH


def test_the_encoder_is_built_once_cached_and_loaded_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path))
    calls = []

    def tiny(folder):  # the real recipe takes a minute; the cache logic is what is tested here
        calls.append(folder)
        torch.manual_seed(0)
        net = demo_encoder.FlareSegNet()
        stats = {"heldout_iou": {"streak": 0.5, "glare": 0.6, "light": 0.4},
                 "random_init_iou": {"streak": 0.1, "glare": 0.2, "light": 0.0}}
        folder.mkdir(parents=True)
        torch.save({"net": net.state_dict(), "feature_mean": torch.full((64,), 2.0),
                    "feature_std": torch.full((64,), 4.0), **stats}, folder / "encoder.pth")
        return folder / "encoder.pth"

    monkeypatch.setattr(demo_encoder, "train_demo_encoder", tiny)
    path = demo_encoder.ensure_demo_encoder()
    assert demo_encoder.ensure_demo_encoder() == path and len(calls) == 1
    assert path.parent.parent == tmp_path.resolve() / "encoders"
    enc = build_encoder("flare_seg", True)
    assert enc.pretrained and "held-out IoU 0.50/0.60/0.40" in enc.weights_source
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.rand(2, 3, 64, 64, requires_grad=True)  # the demo's test size: no resampling
    out = enc(x)
    assert out.shape == (2, enc.embed_dim) == (2, 64)
    # Standardised with the stored statistics: (pooled feature - 2) / 4.
    with torch.no_grad():
        raw = enc.backbone.net.features((x - enc.mean) / enc.std).mean((2, 3))
    torch.testing.assert_close(out, (raw - 2.0) / 4.0)
    out.sum().backward()  # gradients reach the image (the anchor), not the weights
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_random_weights_and_tokens_are_available_without_building():
    assert ENCODERS["flare_seg"] is demo_encoder.build_demo_encoder
    enc = build_encoder("flare_seg", False, features="tokens")
    assert enc.weights_source == "random" and not enc.pretrained
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 64 * 16 * 16) == (1, enc.embed_dim)
    assert math.ceil(math.ceil(100 / 2) / 2) ** 2 * 64 == build_encoder(
        "flare_seg", False, image_size=100, features="tokens").embed_dim


def test_spec_covers_the_generator(monkeypatch):
    import cascade.data.synthetic as synthetic

    before = demo_encoder.encoder_dir()
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/999")
    assert demo_encoder.encoder_dir() != before
