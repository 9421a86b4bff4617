"""Tests for cascade.data.flare7k on a tiny fake Flare7K++ tree built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data import flare7k
from cascade.data.images import write_png
from cascade.errors import UserError

SIDE = 72  # fake flare images (Flare7K's are ~1440 px)


def _blob(radius: float, level: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE / 2 + 0.5
    v = level * np.exp(-(xx**2 + yy**2) / (2 * radius**2))
    return np.repeat(v[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


def _tree(root: Path, light: bool = True) -> tuple[Path, Path]:
    base = root / "Flare7Kpp"
    for k in range(2):
        write_png(base / "Flare7K/Scattering_Flare/Compound_Flare" / f"f{k}.png", _blob(12 + k, 255))
        if light:
            write_png(base / "Flare7K/Scattering_Flare/Light_Source" / f"f{k}.png", _blob(3, 255))
    write_png(base / "Flare7K/Reflective_Flare/r0.png", _blob(6, 60))
    write_png(base / "Flare-R/Compound_Flare/real0.png", _blob(10, 255))
    if light:
        write_png(base / "Flare-R/Light_Source/real0.png", _blob(2, 255))
    bgs = root / "bg"
    for k, shape in enumerate([(40, 50), (20, 24), (64, 64)]):  # one smaller than synth_size
        write_png(bgs / f"b{k}.png", np.full((*shape, 3), 20 + k, np.uint8))
    return base, bgs


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    return _tree(tmp_path)


def test_layout_found(tree: tuple[Path, Path]) -> None:
    sets, reflective = flare7k.find_flare_sets(tree[0])
    assert [s.name for s in sets] == ["Flare7K", "Flare-R"]
    assert [p.name for p in sets[0].flares] == ["f0.png", "f1.png"]
    assert [p.name for p in sets[0].lights] == ["f0.png", "f1.png"]
    assert [p.name for p in reflective] == ["r0.png"]
    # the Flare7K folder itself is accepted as root too
    sets2, _ = flare7k.find_flare_sets(tree[0] / "Flare7K")
    assert [s.name for s in sets2] == ["Flare7K"]


def test_batch_contract_and_determinism(tree: tuple[Path, Path]) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=32)
    assert len(ds) == 3
    a = ds.batch([0, 1, 2])
    for t in a:
        assert t.shape == (3, 3, 16, 16) and float(t.min()) >= 0 and float(t.max()) <= 1
    b = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=32).batch([2, 1])
    for x, y in zip(a, b):  # same sample whatever the batch composition
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=0)
        torch.testing.assert_close(x[2], y[0], rtol=0, atol=0)
    c = ds.batch([0, 1, 2], epoch=1)
    assert not torch.equal(a[0], c[0])


def test_light_source_kept_in_gt(tree: tuple[Path, Path]) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=32, seed=1, synth_size=32, reflective=0.0)
    inp, gt, flare = ds.batch(list(range(3)))
    # backgrounds are dark (~0.1); the light source (255 at its core) must survive in gt
    assert bool((gt.amax(dim=(1, 2, 3)) > 0.6).all())
    # the flare target excludes the light: at gt's brightest pixel flare < input
    for i in range(3):
        j = int(gt[i].mean(0).argmax())
        assert float(flare[i].mean(0).flatten()[j]) < float(inp[i].mean(0).flatten()[j])
    assert float((inp - gt).mean()) > 0  # flare adds light


def test_flare7k_v1_without_light_sources(tmp_path: Path) -> None:
    base, bgs = _tree(tmp_path, light=False)
    ds = flare7k.Flare7KPairs(base, bgs, crop=32, seed=1, synth_size=32, reflective=0.0)
    assert not ds.has_light
    inp, gt, flare = ds.batch([0, 1])
    assert float(gt.amax()) < 0.45  # the background alone
    assert float(flare.amax()) > 0.6


def test_random_erasing_same_box(tree: tuple[Path, Path]) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=32, seed=2, synth_size=32,
                              random_erasing=1.0, flips=False)
    inp, gt, flare = ds.batch([0, 1, 2])
    from cascade.data.synthetic import sample_seed

    p = flare7k._params([sample_seed(2, i) for i in range(3)], torch.device("cpu"))
    ax = torch.arange(32) / 32
    for i in range(3):
        y0, x0, h, w = p["erase_box"][i].tolist()
        inside = (((ax >= y0) & (ax < y0 + h))[:, None] & ((ax >= x0) & (ax < x0 + w))[None])
        assert inside.sum() >= 0.02 * 32 * 32 * 0.5
        fill = p["erase_fill"][i].view(3, 1)
        torch.testing.assert_close(inp[i][:, inside], fill.expand(3, int(inside.sum())))
        torch.testing.assert_close(gt[i][:, inside], inp[i][:, inside], rtol=0, atol=0)
        assert bool((flare[i][:, inside] == 0).all())
        assert not torch.equal(inp[i][:, ~inside], gt[i][:, ~inside])  # flare outside the box


def test_remove_background_per_channel() -> None:
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[0.2, 0.4], [0.6, 0.3]])
    x[0, 1] = torch.tensor([[0.5, 0.5], [0.9, 0.7]])
    y = flare7k._remove_background(x)
    torch.testing.assert_close(y[0, 0], (x[0, 0] - 0.2) * 0.6 / 0.4, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, 1], (x[0, 1] - 0.5) * 0.9 / 0.4, atol=1e-5, rtol=0)


def test_gaussian_blur_preserves_constant_and_mass() -> None:
    x = torch.full((2, 3, 24, 24), 0.3)
    y = flare7k._gaussian_blur(x, torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope: Flare7K folder does not exist"):
        flare7k.find_flare_sets(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no Scattering_Flare/Compound_Flare"):
        flare7k.find_flare_sets(tmp_path / "empty")
    base, bgs = _tree(tmp_path / "t")
    (base / "Flare7K/Scattering_Flare/Light_Source/f1.png").unlink()
    with pytest.raises(UserError, match="f1.png: Light_Source and Compound_Flare do not match"):
        flare7k.find_flare_sets(base)
    base, bgs = _tree(tmp_path / "u")
    with pytest.raises(UserError, match="missing: backgrounds folder does not exist"):
        flare7k.Flare7KPairs(base, tmp_path / "missing", crop=16, seed=0, synth_size=32)
    (tmp_path / "nobg").mkdir()
    with pytest.raises(UserError, match="nobg: no background images"):
        flare7k.Flare7KPairs(base, tmp_path / "nobg", crop=16, seed=0, synth_size=32)
    with pytest.raises(UserError, match="crop <= synth_size"):
        flare7k.Flare7KPairs(base, bgs, crop=64, seed=0, synth_size=32)
