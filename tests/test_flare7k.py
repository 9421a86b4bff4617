"""Tests for cascade.data.flare7k on tiny fake Flare7K(++) trees built here.

Synthesis runs at synth_size 32, i.e. the official 512 px pipeline at scale 1/16: the fake flare
files are 512 px (Flare7K's are ~1440) and come out 32 px, like a 512 px crop of a 512 px flare.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from cascade.data import flare7k
from cascade.data.erasing import erase_box, erasing_generator
from cascade.data.images import write_png
from cascade.errors import UserError

SYNTH = 32
SIDE = 16 * SYNTH  # fake flare files; synth_size 32 uses them at 1/16
N_BG = 6
LIGHT_LEVEL = 100  # uint8 level of the flat light sources of `_flat_tree`


def _blob(radius: float, level: int, shape: tuple[int, int] = (SIDE, SIDE)) -> np.ndarray:
    """A centred Gaussian blob, (H, W, 3) uint8; radius in file pixels."""
    yy, xx = np.mgrid[:shape[0], :shape[1]] - np.array(shape)[:, None, None] / 2 + 0.5
    v = level * np.exp(-(xx**2 + yy**2) / (2 * radius**2))
    return np.repeat(v[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


def _backgrounds(folder: Path, level: int | None = None) -> Path:
    """N_BG flat backgrounds, file k at level 20 + 10 k (or all at `level`), some smaller than
    SYNTH (reflect padding) and one not square."""
    shapes = [(40, 50), (20, 24), (64, 64), (33, 40), (48, 31), (90, 70)]
    for k, shape in enumerate(shapes[:N_BG]):
        write_png(folder / f"b{k}.png", np.full((*shape, 3), 20 + 10 * k if level is None
                                                else level, np.uint8))
    return folder


def _tree(root: Path, light: bool = True) -> tuple[Path, Path]:
    base = root / "Flare7Kpp"
    for k in range(2):
        write_png(base / "Flare7K/Scattering_Flare/Compound_Flare" / f"f{k}.png",
                  _blob(16 * (12 + k), 255))
        if light:
            write_png(base / "Flare7K/Scattering_Flare/Light_Source" / f"f{k}.png",
                      _blob(16 * 3, 255))
    write_png(base / "Flare7K/Reflective_Flare/r0.png", _blob(16 * 6, 60))
    write_png(base / "Flare-R/Compound_Flare/real0.png", _blob(16 * 10, 255))
    if light:
        write_png(base / "Flare-R/Light_Source/real0.png", _blob(16 * 2, 255))
    return base, _backgrounds(root / "bg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One read-only tree for the tests that do not change it (PNG writing is the slow part)."""
    return _tree(tmp_path_factory.mktemp("flare7kpp"))


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
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=SYNTH)
    assert len(ds) == N_BG and ds.loader == "flare7kpp"
    a = ds.batch([0, 1, 2])
    for t in a:
        assert t.shape == (3, 3, 16, 16) and float(t.min()) >= 0 and float(t.max()) <= 1
    b = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=SYNTH).batch([2, 1])
    for x, y in zip(a, b):  # same sample whatever the batch composition
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=0)
        torch.testing.assert_close(x[2], y[0], rtol=0, atol=0)
    c = ds.batch([0, 1, 2], epoch=1)
    assert not torch.equal(a[0], c[0])
    # epoch e of index i is sample e * len + i
    for x, y in zip(c, ds.batch([N_BG, N_BG + 1, N_BG + 2])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- the official Flare7K++ / v1 differences -----------------------------------------------------
def _flat_tree(root: Path, light: bool) -> tuple[Path, Path]:
    """Black compound flares (background removal leaves 0), flat light sources at LIGHT_LEVEL,
    black backgrounds: every value in the outputs can be predicted exactly."""
    base = root / "Flare7Kpp"
    black = np.zeros((SIDE, SIDE, 3), np.uint8)
    for k in range(2):
        write_png(base / "Flare7K/Scattering_Flare/Compound_Flare" / f"f{k}.png", black)
        if light:
            write_png(base / "Flare7K/Scattering_Flare/Light_Source" / f"f{k}.png",
                      np.full((SIDE, SIDE, 3), LIGHT_LEVEL, np.uint8))
    return base, _backgrounds(root / "bg", level=0)


def test_flare7kpp_light_source_intensity_unchanged(tmp_path: Path) -> None:
    """Flare7K++: no brightness jitter (the light keeps its level in gt) and no DC offset (a
    black flare stays exactly 0)."""
    ds = flare7k.Flare7KPairs(*_flat_tree(tmp_path, light=True), crop=SYNTH, seed=5,
                              synth_size=SYNTH, reflective=False)
    inp, gt, flare = ds.batch(list(range(8)))
    level = LIGHT_LEVEL / 255
    for i in range(8):
        # The background is black plus clamped noise, so wherever its noise is <= 0 (about half
        # of the light's pixels) gt is the light alone: (level^g)^(1/g) = level.
        exact = (gt[i] - level).abs() < 1e-5
        assert float(exact.float().mean()) > 0.1, i
    assert float(flare.abs().max()) == 0.0  # no DC offset, no flare
    assert bool((inp <= gt + 1e-6).all())  # input = background only, gt = background + light


def test_flare7k_v1_brightness_jitter_and_dc(tmp_path: Path) -> None:
    """v1: the flare is scaled by ColorJitter's factor (clamped) and offset by the DC term."""
    base = tmp_path / "Flare7K"
    # 96 px at synth 32: its flat interior covers the crop's centre after any affine and blur
    disc = np.zeros((3 * SIDE, 3 * SIDE, 3), np.uint8)
    disc[16:-16, 16:-16] = 128  # flat square with a black rim: background removal keeps it
    write_png(base / "Scattering_Flare/Compound_Flare/f0.png", disc)
    ds = flare7k.Flare7KPairs(base, _backgrounds(tmp_path / "bg", level=0), crop=SYNTH, seed=3,
                              synth_size=SYNTH, reflective=False, flips=False)
    assert ds.loader == "flare7k"
    n = 8
    _, gt, flare = ds.batch(list(range(n)))
    p = flare7k._params([ds.decode(i).seed for i in range(n)])
    c = (128 / 255) ** p["gamma"]
    want = ((p["brightness"] * c).clamp(0, 1) + p["dc"]).clamp(0, 1) ** (1 / p["gamma"])
    for i in range(n):
        # the flat interior (away from the blurred edges) has exactly the jittered level
        centre = flare[i, :, 12:20, 12:20]
        torch.testing.assert_close(centre, torch.full_like(centre, float(want[i])), atol=1e-4,
                                   rtol=0)
    assert float((want - 128 / 255).abs().mean()) > 0.05  # the jitter really moves the level
    assert float(gt.mean()) < 0.05  # v1: gt is the (black, noisy) background alone


def _reference_sample(r: flare7k.RawSample, p: dict[str, torch.Tensor], i: int, size: int,
                      v1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official __getitem__ (flare7kpp_dataset.py:95-177, flare7k_dataset.py:88-142) step by
    step with torchvision ops, given our decoded files and random draws."""
    g = float(p["gamma"][i])

    def lin(x: torch.Tensor) -> torch.Tensor:
        return TF.adjust_gamma(x.float() / 255, g, gain=1)

    noise = torch.randn(3, size, size, generator=flare7k._dev_gen(r.seed, torch.device("cpu")))
    base = (float(p["gain"][i]) * (lin(r.background) + float(p["sigma"][i]) * noise)).clamp(0, 1)
    flare = lin(r.flare)
    if r.reflective is not None:
        flare = (flare + TF.center_crop(lin(r.reflective), list(flare.shape[1:]))).clamp(0, 1)
    flare = flare7k._remove_background(flare[None])[0]  # ours: per channel (deliberate)
    merge = torch.cat([flare, lin(r.light)]) if r.light is not None else flare
    h, w = merge.shape[1:]
    tx = int(round(float(p["translate"][i, 0]) * 300 / 1440 * w))
    ty = int(round(float(p["translate"][i, 1]) * 300 / 1440 * h))
    merge = TF.affine(merge, float(p["angle"][i]), [tx, ty], float(p["scale"][i]),
                      [float(p["shear"][i]), 0.0], interpolation=InterpolationMode.NEAREST,
                      fill=[0.0] * merge.shape[0])
    merge = TF.center_crop(merge, [size, size])
    if p["flare_flip"][i, 0] > 0.5:
        merge = TF.hflip(merge)
    if p["flare_flip"][i, 1] > 0.5:
        merge = TF.vflip(merge)
    flare = merge[:3]
    if v1:
        flare = TF.adjust_brightness(flare, float(p["brightness"][i]))
    sigma = float(p["blur_sigma"][i])
    flare = TF.gaussian_blur(flare, [21, 21], [sigma, sigma])
    if v1:
        flare = flare + float(p["dc"][i])
    flare = flare.clamp(0, 1)
    merge_img = (flare + base).clamp(0, 1)
    if r.light is not None:
        light = merge[3:]
        base = (base + light).clamp(0, 1)
        flare = (flare - light).clamp(0, 1)
    def enc(x: torch.Tensor) -> torch.Tensor:
        return TF.adjust_gamma(x, 1 / g, gain=1)
    return enc(merge_img), enc(base), enc(flare)


@pytest.mark.parametrize("light", [True, False], ids=["flare7kpp", "flare7k_v1"])
def test_synthesis_matches_official_steps(tmp_path: Path, light: bool) -> None:
    """Our batched synthesis == the official per-sample pipeline in torchvision ops, on files of
    mixed, non-square sizes (some smaller than the crop) and a reflective flare of another size."""
    base = tmp_path / "Flare7Kpp"
    for k, shape in enumerate([(SIDE, SIDE), (400, 560), (300, 700)]):
        write_png(base / "Flare7K/Scattering_Flare/Compound_Flare" / f"f{k}.png",
                  _blob(120 + 20 * k, 255, shape))
        if light:
            write_png(base / "Flare7K/Scattering_Flare/Light_Source" / f"f{k}.png",
                      _blob(40, 255, shape))
    write_png(base / "Flare7K/Reflective_Flare/r0.png", _blob(80, 90, (600, 460)))
    ds = flare7k.Flare7KPairs(base, _backgrounds(tmp_path / "bg"), crop=SYNTH, seed=11,
                              synth_size=SYNTH, flips=False)
    idx = list(range(10))
    inp, gt, flare = ds.batch(idx)
    raws = [ds.decode(i) for i in idx]
    p = flare7k._params([r.seed for r in raws])
    assert {tuple(r.flare.shape[1:]) for r in raws} > {(32, 32)}  # sizes really differ
    for i, r in enumerate(raws):
        ref = _reference_sample(r, p, i, SYNTH, v1=not light)
        for ours, theirs in zip((inp[i], gt[i], flare[i]), ref):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_reflective_on_every_flare7k_and_no_flare_r_flare(tree: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=SYNTH)
    raws = [ds.decode(i) for i in range(40)]
    sets = [r.flare_set for r in raws]
    assert 10 < sets.count("Flare7K") < 30  # the two sets 1:1
    for r in raws:
        assert (r.reflective is not None) == (r.flare_set == "Flare7K"), r.flare_set
    # v1 (no light sources): a reflective flare on every sample
    v1 = flare7k.Flare7KPairs(*_tree(tmp_path / "v1", light=False), crop=16, seed=0,
                              synth_size=SYNTH)
    assert all(v1.decode(i).reflective is not None for i in range(20))
    # reflective=False: none
    off = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=SYNTH,
                               reflective=False)
    assert all(off.decode(i).reflective is None for i in range(20))


# -- background order ----------------------------------------------------------------------------
def test_background_order_is_a_seeded_permutation_per_epoch() -> None:
    orders = {(s, e): flare7k.background_order(50, s, e).tolist() for s in (0, 1) for e in (0, 1)}
    for order in orders.values():
        assert sorted(order) == list(range(50))
    assert len({tuple(o) for o in orders.values()}) == 4  # seeds and epochs all differ
    assert orders[(0, 0)] == flare7k.background_order.__wrapped__(50, 0, 0).tolist()
    assert orders[(0, 0)] != list(range(50))


def test_backgrounds_shuffled_per_epoch(tree: tuple[Path, Path]) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=0, synth_size=SYNTH)
    # flat background k has level 20 + 10 k: the decoded crop says which file a sample used
    def used(pairs: flare7k.Flare7KPairs, i: int) -> int:
        r = pairs.decode(i)
        assert r.background_index == pairs.background_of(i)
        return (int(r.background[0, 0, 0]) - 20) // 10

    epochs = [[used(ds, e * N_BG + j) for j in range(N_BG)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(N_BG))  # each epoch visits every background once
    assert len({tuple(o) for o in epochs}) == 3  # a new order every epoch
    other = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=1, synth_size=SYNTH)
    assert [used(other, j) for j in range(N_BG)] != epochs[0]  # and for every seed


def test_resumed_run_sees_the_same_samples(tree: tuple[Path, Path]) -> None:
    full = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=4, synth_size=SYNTH)
    a = full.batch(list(range(2 * N_BG)))
    # a fresh object (a resumed trial) starting mid-epoch and crossing into the next epoch
    resumed = flare7k.Flare7KPairs(tree[0], tree[1], crop=16, seed=4, synth_size=SYNTH)
    start = N_BG - 2
    b = resumed.batch(list(range(start, start + 4)))
    for x, y in zip(a, b):
        torch.testing.assert_close(x[start:start + 4], y, rtol=0, atol=0)


# -- sizes ---------------------------------------------------------------------------------------
def test_non_1440_px_files_at_their_own_pixels(tmp_path: Path) -> None:
    """At synth_size 512 files are used unresized, whatever their size; other sizes scale them."""
    base = tmp_path / "Flare7K"
    write_png(base / "Scattering_Flare/Compound_Flare/f0.png", _blob(90, 255, (600, 700)))
    write_png(base / "Reflective_Flare/r0.png", _blob(60, 80, (300, 260)))
    bgs = _backgrounds(tmp_path / "bg")
    ds = flare7k.Flare7KPairs(base, bgs, crop=64, seed=0)
    r = ds.decode(0)
    assert tuple(r.flare.shape) == (3, 600, 700) and tuple(r.reflective.shape) == (3, 300, 260)
    assert tuple(r.background.shape) == (3, 512, 512)  # reflect-padded from 40 x 50 and cropped
    inp, gt, flare = ds.batch([0])
    assert inp.shape == (1, 3, 64, 64) and float(flare.max()) > 0
    small = flare7k.Flare7KPairs(base, bgs, crop=16, seed=0, synth_size=64)
    assert tuple(small.decode(0).flare.shape) == (3, 75, 88)  # 600 x 700 at 64 / 512


@pytest.mark.parametrize("shape,size", [((90, 70), 32), ((20, 50), 32), ((33, 33), 33),
                                        ((64, 41), 16)])
def test_affine_center_crop_is_torchvision(shape: tuple[int, int], size: int) -> None:
    """RandomAffine's transform (NEAREST, zero fill) + CenterCrop, computed on the crop only."""
    g = torch.Generator().manual_seed(sum(shape) + size)
    img = torch.rand(6, *shape, generator=g)
    for _ in range(20):
        angle = 360 * float(torch.rand(1, generator=g))
        scale = 0.8 + 0.7 * float(torch.rand(1, generator=g))
        shear = 40 * float(torch.rand(1, generator=g)) - 20
        tx = round((2 * float(torch.rand(1, generator=g)) - 1) * 300 / 1440 * shape[1])
        ty = round((2 * float(torch.rand(1, generator=g)) - 1) * 300 / 1440 * shape[0])
        ref = TF.center_crop(TF.affine(img, angle, [tx, ty], scale, [shear, 0.0],
                                       interpolation=InterpolationMode.NEAREST, fill=[0.0] * 6),
                             [size, size])
        out = flare7k.affine_center_crop(img, angle, (tx, ty), scale, shear, size)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# -- augmentation --------------------------------------------------------------------------------
def test_random_erasing_on_the_input_changes_input_only(tree: tuple[Path, Path]) -> None:
    kw = dict(crop=16, seed=2, synth_size=SYNTH, erasing_on="input")
    plain = flare7k.Flare7KPairs(tree[0], tree[1], **kw).batch([0, 1, 2, 3])
    off = flare7k.Flare7KPairs(tree[0], tree[1], random_erasing=0.0, **kw)
    for x, y in zip(plain, off.batch([0, 1, 2, 3])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    on = flare7k.Flare7KPairs(tree[0], tree[1], random_erasing=1.0, **kw)
    inp, gt, flare = on.batch([0, 1, 2, 3])
    torch.testing.assert_close(gt, plain[1], rtol=0, atol=0)
    torch.testing.assert_close(flare, plain[2], rtol=0, atol=0)
    for i in range(4):
        box = erase_box(erasing_generator(on.decode(i).seed), 16, 16, 1.0)
        assert box is not None
        top, left, h, w = box
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert bool((inp[i][:, inside] == 0).all())
        torch.testing.assert_close(inp[i][:, ~inside], plain[0][i][:, ~inside], rtol=0, atol=0)
        assert not torch.equal(inp[i], plain[0][i])


def test_random_erasing_of_the_background_puts_one_box_in_input_and_gt(tmp_path: Path) -> None:
    # The paper's reading: the background is erased before the flare is added. The same box (the
    # one `erase_box` draws for the sample, in the returned crop, after the crop and the flips)
    # changes gt and input; nothing outside it changes. Backgrounds are flat and bright (level
    # 200), so zeroing them changes every pixel of the box in gt.
    # A dim flare, so that input = clamp(background + flare) does not saturate over the box.
    base = tmp_path / "Flare7k"
    write_png(base / "Scattering_Flare/Compound_Flare/f0.png", _blob(16 * 12, 40))
    write_png(base / "Reflective_Flare/r0.png", _blob(16 * 6, 20))
    bg = _backgrounds(tmp_path / "bg", level=200)
    kw = dict(crop=16, seed=3, synth_size=SYNTH, loader="flare7k")
    plain = flare7k.Flare7KPairs(base, bg, **kw).batch(range(6))
    on = flare7k.Flare7KPairs(base, bg, random_erasing=1.0, erasing_on="background", **kw)
    inp, gt, flare = on.batch(range(6))
    torch.testing.assert_close(flare, plain[2], rtol=0, atol=0)  # the flare target is untouched
    for i in range(6):
        top, left, h, w = erase_box(erasing_generator(on.decode(i).seed), 16, 16, 1.0)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        gt_changed = (gt[i] != plain[1][i]).any(dim=0)
        assert bool(gt_changed[inside].all()) and not bool(gt_changed[~inside].any())
        in_changed = (inp[i] != plain[0][i]).any(dim=0)
        assert not bool(in_changed[~inside].any()) and bool(in_changed[inside].any())
        # The box holds the same content in input and gt where no flare is on it.
        no_flare = inside & (flare[i].amax(dim=0) == 0)
        torch.testing.assert_close(inp[i][:, no_flare], gt[i][:, no_flare], rtol=0, atol=0)


def test_v1_loader_ignores_the_light_source_folder_the_v1_release_ships(tmp_path: Path) -> None:
    # The v1 release has Scattering_Flare/Light_Source, which its loader never reads: by layout
    # the data would be taken for Flare7K++; loader="flare7k" reads Compound_Flare and
    # Reflective_Flare only (no Flare-R).
    base, bg = _tree(tmp_path, light=True)
    by_layout = flare7k.Flare7KPairs(base, bg, crop=16, seed=0, synth_size=SYNTH)
    v1 = flare7k.Flare7KPairs(base, bg, crop=16, seed=0, synth_size=SYNTH, loader="flare7k")
    assert by_layout.loader == "flare7kpp" and v1.loader == "flare7k"
    assert [s.name for s in v1.sets] == ["Flare7K"] and v1.sets[0].lights is None
    assert len(v1.reflective_files) == 1
    with pytest.raises(UserError, match="data_loader=flare7kpp needs Scattering_Flare/Light_Source"):
        flare7k.find_flare_sets(_tree(tmp_path / "v1", light=False)[0], "flare7kpp")
    assert flare7k.LOADERS == __import__("cascade.config", fromlist=["x"]).DATA_LOADERS


def test_light_source_kept_in_gt(tree: tuple[Path, Path]) -> None:
    ds = flare7k.Flare7KPairs(tree[0], tree[1], crop=SYNTH, seed=1, synth_size=SYNTH,
                              reflective=False)
    inp, gt, flare = ds.batch(list(range(4)))
    # backgrounds are dark (<= 0.3); the light source (255 at its core) must survive in gt
    assert bool((gt.amax(dim=(1, 2, 3)) > 0.6).all())
    # the flare target excludes the light: at gt's brightest pixel flare < input
    for i in range(4):
        j = int(gt[i].mean(0).argmax())
        assert float(flare[i].mean(0).flatten()[j]) < float(inp[i].mean(0).flatten()[j])
    assert float((inp - gt).mean()) > 0  # flare adds light


def test_remove_background_per_channel() -> None:
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[0.2, 0.4], [0.6, 0.3]])
    x[0, 1] = torch.tensor([[0.5, 0.5], [0.9, 0.7]])
    y = flare7k._remove_background(x)
    torch.testing.assert_close(y[0, 0], (x[0, 0] - 0.2) * 0.6 / 0.4, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, 1], (x[0, 1] - 0.5) * 0.9 / 0.4, atol=1e-5, rtol=0)


def test_gaussian_blur_is_torchvision() -> None:
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 3.0])
    y = flare7k._gaussian_blur(x, sigma)
    for i in range(2):
        s = float(sigma[i])
        torch.testing.assert_close(y[i], TF.gaussian_blur(x[i], [21, 21], [s, s]), atol=1e-6,
                                   rtol=0)


def test_inverse_affine_matrix_undoes_the_forward_map() -> None:
    m = flare7k.inverse_affine_matrix(30.0, (5, -3), 1.25, 10.0)
    rot, sx = math.radians(30.0), math.radians(10.0)
    # forward: T * R(rot) * Shear_x(sx) * scale (torchvision's convention, sy = 0)
    fwd = np.array([[math.cos(rot), -math.cos(rot) * math.tan(sx) - math.sin(rot)],
                    [math.sin(rot), -math.sin(rot) * math.tan(sx) + math.cos(rot)]]) * 1.25
    pt = np.array([7.0, 2.0])
    out = fwd @ pt + np.array([5, -3])
    inv = np.array(m).reshape(2, 3)
    np.testing.assert_allclose(inv[:, :2] @ out + inv[:, 2], pt, atol=1e-12)


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
        flare7k.Flare7KPairs(base, tmp_path / "missing", crop=16, seed=0, synth_size=SYNTH)
    (tmp_path / "nobg").mkdir()
    with pytest.raises(UserError, match="nobg: no background images"):
        flare7k.Flare7KPairs(base, tmp_path / "nobg", crop=16, seed=0, synth_size=SYNTH)
    with pytest.raises(UserError, match="crop <= synth_size"):
        flare7k.Flare7KPairs(base, bgs, crop=64, seed=0, synth_size=SYNTH)
    with pytest.raises(UserError, match="random_erasing=1.5 is not a probability"):
        flare7k.Flare7KPairs(base, bgs, crop=16, seed=0, synth_size=SYNTH, random_erasing=1.5)
    # a light source of another size than its flare cannot share its affine
    write_png(base / "Flare-R/Light_Source/real0.png", _blob(20, 255, (SIDE, SIDE + 32)))
    ds = flare7k.Flare7KPairs(base, bgs, crop=16, seed=0, synth_size=SYNTH)
    with pytest.raises(UserError, match="real0.png: light source is"):
        for i in range(40):
            ds.decode(i)
