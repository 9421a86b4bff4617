"""Tests for cascade.data.synthetic: determinism, mask semantics, CLI, contract shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data import synthetic
from cascade.data.erasing import erase_box, erasing_generator
from cascade.data.images import read_rgb
from cascade.errors import UserError
from cascade.masks import MASK_COLOURS, region_weights

SIZE = 48


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] on 8-bit levels -> (H, W, 3) uint8, as the PNGs store it."""
    return (image * 255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pairs() -> synthetic.ProceduralPairs:
    return synthetic.ProceduralPairs(SIZE, seed=3)


@pytest.fixture(scope="module")
def rendered(pairs: synthetic.ProceduralPairs) -> synthetic.Rendered:
    return pairs.render(list(range(6)))


def test_batch_contract(pairs: synthetic.ProceduralPairs) -> None:
    inp, gt, flare = pairs.batch(torch.tensor([0, 5]), "cpu")
    for t in (inp, gt, flare):
        assert t.shape == (2, 3, SIZE, SIZE) and t.dtype == torch.float32
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        # values sit on 8-bit levels, exactly what the PNGs store
        torch.testing.assert_close(t * 255, torch.round(t * 255), atol=1e-4, rtol=0)


def test_sample_is_pure_function_of_seed_and_index(pairs: synthetic.ProceduralPairs) -> None:
    a = pairs.batch([4, 1, 2])
    b = synthetic.ProceduralPairs(SIZE, seed=3).batch([2, 4])  # fresh object, other batch
    for x, y in zip(a, b):
        torch.testing.assert_close(x[0], y[1], rtol=0, atol=0)
        torch.testing.assert_close(x[2], y[0], rtol=0, atol=0)
    other = synthetic.ProceduralPairs(SIZE, seed=4).batch([4])
    assert not torch.equal(a[0][0], other[0][0])
    epoch1 = pairs.batch([4], epoch=1)
    assert not torch.equal(a[0][0], epoch1[0][0])


def test_input_is_gt_plus_flare(rendered: synthetic.Rendered) -> None:
    # Flare is additive in linear space with shared noise, so input >= gt everywhere.
    assert bool((rendered.input >= rendered.gt - 1e-6).all())
    assert float(rendered.flare.amax()) > 0.5  # every batch has a visible flare


def test_input_brighter_than_gt_exactly_where_mask_says_flare(rendered: synthetic.Rendered) -> None:
    diff = (rendered.input - rendered.gt).mean(1)  # (B, S, S)
    flare = (rendered.streak | rendered.glare) & ~rendered.light
    other = ~(rendered.streak | rendered.glare | rendered.light)
    assert flare.sum() > 100 and other.sum() > 1000
    # where the mask says flare, input is clearly brighter (threshold 0.18 encoded)
    assert float((diff[flare] > 0.03).float().mean()) > 0.95
    assert float(diff[flare].mean()) > 0.15
    # elsewhere the difference is at most faint haze
    assert float(diff[other].mean()) < 0.05
    assert float(diff[other].mean()) < float(diff[flare].mean()) / 4


def test_light_mask_is_saturated_in_gt(rendered: synthetic.Rendered) -> None:
    assert rendered.light.any()
    gt_luma = rendered.gt.mean(1)
    assert float(gt_luma[rendered.light].mean()) > 0.9  # gt keeps the light source


def test_generate_dataset_byte_identical_and_masks_decode(tmp_path: Path) -> None:
    a = synthetic.generate_dataset(tmp_path / "a", n=3, size=32, seed=7)
    b = synthetic.generate_dataset(tmp_path / "b", n=3, size=32, seed=7)
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == ["gt/000000.png", "gt/000001.png", "gt/000002.png",
                     "input/000000.png", "input/000001.png", "input/000002.png",
                     "mask/000000.png", "mask/000001.png", "mask/000002.png", "synthetic.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # written images are exactly the rendered batch; masks decode to the rendered regions
    r = synthetic.ProceduralPairs(32, seed=7, split="test").render([0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(read_rgb(a / f"input/{i:06d}.png"),
                                      (r.input[i] * 255).round().byte().permute(1, 2, 0).numpy())
        mask = read_rgb(a / f"mask/{i:06d}.png")
        colours = {tuple(c) for c in mask.reshape(-1, 3)}
        assert colours <= set(MASK_COLOURS.values())
        w = region_weights(mask)
        np.testing.assert_array_equal(w["light"] == 1, r.light[i].numpy())
        np.testing.assert_array_equal(w["streak"] == 1, (r.streak[i] & ~r.light[i]).numpy())
        np.testing.assert_array_equal(w["glare"] == 1,
                                      (r.glare[i] & ~r.streak[i] & ~r.light[i]).numpy())


def test_cli_writes_dataset_and_contact_sheet(tmp_path: Path) -> None:
    synthetic.main(["--out", str(tmp_path / "d"), "--n", "2", "--size", "32", "--seed", "1",
                    "--contact-sheet", str(tmp_path / "sheet.png")])
    assert len(list((tmp_path / "d" / "mask").iterdir())) == 2
    sheet = read_rgb(tmp_path / "sheet.png")
    assert sheet.shape == (3 * 32 + 2 * 4, 4 * 32 + 3 * 4, 3)


def test_cli_rejects_bad_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--out", str(tmp_path), "--n", "0"])
    assert exc.value.code == 2
    assert "n=0 must be >= 1" in capsys.readouterr().err


def test_only_bundled_skimage_scenes() -> None:
    for group, names in synthetic.SCENES.items():
        bank = synthetic._scene_bank(64, group)
        assert bank.shape == (len(names), 3, 64, 64)
        assert float(bank.min()) >= 0 and float(bank.max()) <= 1


# -- splits: no test scene, crop source, PSF or flare in any training data (issue 20) -----------


def test_photographs_are_split_by_file_and_by_content() -> None:
    train, test = synthetic.SCENES["train"], synthetic.SCENES["test"]
    assert set(train).isdisjoint(test) and len(test) >= 3 and len(train) >= 5
    # By content too: no test photo equals (or is a resized copy of) a training photo.
    a, b = synthetic._scene_bank(32, "train"), synthetic._scene_bank(32, "test")
    distance = (a[:, None] - b[None]).abs().mean(dim=(2, 3, 4))  # (train, test)
    assert float(distance.min()) > 0.02
    assert [synthetic.scene_split(s) for s in synthetic.SPLITS] == ["train", "train", "train", "test"]


def test_every_training_split_is_disjoint_from_the_test_split_by_construction() -> None:
    # Seeds: every sample, PSF bank and noise bank seed of a training split differs from the test
    # split's, for the same numeric seed (the old collision: a trial seed equal to TEST_SEED).
    from cascade.data.testset import TEST_SEED, TEST_SPLIT

    test = {synthetic.split_seed(TEST_SPLIT, TEST_SEED, 0, i) for i in range(64)}
    test |= {synthetic.split_seed(TEST_SPLIT, TEST_SEED, part) for part in ("psf", "noise")}
    for split in synthetic.TRAINING_SPLITS:
        for seed in (0, 1, TEST_SEED, 1000):
            mine = {synthetic.split_seed(split, seed, 0, i) for i in range(64)}
            mine |= {synthetic.split_seed(split, seed, part) for part in ("psf", "noise")}
            assert mine.isdisjoint(test), (split, seed)


def test_a_trial_seeded_like_the_test_set_never_renders_the_test_images() -> None:
    # Asserted on pixels: the "train" stream with the test set's seed shares no image, no PSF and
    # no photograph with the test stream.
    from cascade.data.testset import TEST_SEED

    idx = list(range(6))
    test = synthetic.ProceduralPairs(32, TEST_SEED, split="test")
    train = synthetic.ProceduralPairs(32, TEST_SEED)  # what a trial with seed=TEST_SEED gets
    a, b = test.render(idx), train.render(idx)
    for i in idx:
        for j in idx:
            assert not torch.equal(a.gt[i], b.gt[j]) and not torch.equal(a.input[i], b.input[j])
    psf_test, scenes_test, _ = test._banks(torch.device("cpu"))
    psf_train, scenes_train, _ = train._banks(torch.device("cpu"))
    assert not any(torch.allclose(p, q) for p in psf_test for q in psf_train)
    assert scenes_test.shape[0] == len(synthetic.SCENES["test"])
    assert scenes_train.shape[0] == len(synthetic.SCENES["train"])


def test_the_test_split_is_refused_as_training_pairs_and_unknown_splits_are_refused() -> None:
    with pytest.raises(UserError, match="the test split renders test sets only"):
        synthetic.ProceduralPairs(32, 0, split="test").batch([0])
    with pytest.raises(UserError, match="split 'val' is unknown; expected one of base, train"):
        synthetic.ProceduralPairs(32, 0, split="val")
    with pytest.raises(UserError, match="split 'x' is unknown"):
        synthetic.split_seed("x", 0, 1)


def test_generated_test_sets_come_from_the_test_split(tmp_path: Path) -> None:
    out = synthetic.generate_dataset(tmp_path / "t", n=2, size=32, seed=5)
    r = synthetic.ProceduralPairs(32, 5, split="test").render([0, 1])
    np.testing.assert_array_equal(read_rgb(out / "gt/000001.png"), to_numpy(r.gt[1]))
    assert '"split": "test"' in (out / "synthetic.json").read_text()


# -- scale: training crops are cut from frames rendered at the test resolution -------------------


def test_a_crop_is_a_window_of_the_frame_at_the_test_resolution() -> None:
    frame, crop = 64, 32
    cropped = synthetic.ProceduralPairs(crop, 2, frame=frame)
    whole = synthetic.ProceduralPairs(frame, 2)
    idx = [0, 1, 2, 3]
    c, w = cropped.render(idx), whole.render(idx)
    assert c.input.shape == (4, 3, crop, crop) and c.streak.shape == (4, crop, crop)
    offsets = set()
    for j, seed in enumerate(cropped.sample_seeds(idx)):
        top, left = (int(v) for v in cropped._params(seed)["frame_at"])
        offsets.add((top, left))
        assert 0 <= top <= frame - crop and 0 <= left <= frame - crop
        for name in ("input", "gt", "flare", "streak", "glare", "light"):
            part = getattr(w, name)[j][..., top:top + crop, left:left + crop]
            assert torch.equal(getattr(c, name)[j], part), name
    assert len(offsets) > 1  # per-sample positions
    with pytest.raises(UserError, match="frame=16 is smaller than the crop size=32"):
        synthetic.ProceduralPairs(32, 0, frame=16)


# -- camera: Flare7K's noise and gain -------------------------------------------------------------


def test_camera_draws_follow_flare7k() -> None:
    pairs = synthetic.ProceduralPairs(32, 0)
    draws = [pairs._params(s) for s in pairs.sample_seeds(range(4000))]
    sigma = np.array([d["sigma"] for d in draws])
    gain = np.array([d["gain"] for d in draws])
    gamma = np.array([d["gamma"] for d in draws])
    # sigma = 0.01 * chi2(1): mean 0.01, median 0.01 * 0.455, P(sigma > 0.01 * 3.84) = 5 %
    assert sigma.mean() == pytest.approx(0.01, rel=0.1)
    assert np.median(sigma) == pytest.approx(0.01 * 0.4549, rel=0.1)
    assert (sigma > 0.0384).mean() == pytest.approx(0.05, abs=0.015)
    assert 0.5 <= gain.min() and gain.max() <= 1.2 and gain.mean() == pytest.approx(0.85, abs=0.02)
    assert 1.8 <= gamma.min() and gamma.max() <= 2.2


def test_noise_is_flare7k_sized_relative_to_the_scene() -> None:
    # Noise alone must not dominate SSIM: a noise-free ground truth keeps SSIM > 0.9 on average
    # against the noisy one (the earlier shot/read model: ~0.5).
    from cascade.metrics import ssim_map

    idx = list(range(16))
    noisy = synthetic.ProceduralPairs(64, 9, split="test").render(idx)
    bank = synthetic._noise_bank
    try:
        synthetic._noise_bank = lambda *a: torch.zeros_like(bank(*a))
        clean = synthetic.ProceduralPairs(64, 9, split="test").render(idx)
    finally:
        synthetic._noise_bank = bank
    assert not torch.equal(noisy.gt, clean.gt)
    ssims = [ssim_map(to_numpy(clean.gt[i]), to_numpy(noisy.gt[i]))[0] for i in idx]
    assert np.mean(ssims) > 0.9


def test_random_erasing_of_the_background_is_in_input_and_gt_at_the_crop() -> None:
    # "background": the scene is zeroed in the box before lights and flare are added; the box is
    # a box of the returned crop, also when the crop is a window of a larger frame.
    idx = [0, 5, 2]
    kw = dict(seed=3, frame=2 * SIZE)
    plain = synthetic.ProceduralPairs(SIZE, **kw).batch(idx)
    inp, gt, flare = synthetic.ProceduralPairs(SIZE, random_erasing=1.0, erasing_on="background",
                                               **kw).batch(idx)
    torch.testing.assert_close(flare, plain[2], rtol=0, atol=0)
    for j, i in enumerate(idx):
        top, left, h, w = erase_box(erasing_generator(synthetic.split_seed("train", 3, 0, i)),
                                    SIZE, SIZE, 1.0)
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        for new, old in ((gt[j], plain[1][j]), (inp[j], plain[0][j])):
            changed = (new != old).any(dim=0)
            assert not bool(changed[~inside].any())
        assert bool((gt[j] != plain[1][j]).any(dim=0)[inside].any())  # the box is in gt


def test_random_erasing_changes_input_only(pairs: synthetic.ProceduralPairs) -> None:
    idx = [0, 5, 2]
    plain = pairs.batch(idx)
    off = synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=0.0).batch(idx)
    for x, y in zip(plain, off):  # p = 0: exactly today's pairs
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    inp, gt, flare = synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=1.0,
                                               erasing_on="input").batch(idx)
    torch.testing.assert_close(gt, plain[1], rtol=0, atol=0)
    torch.testing.assert_close(flare, plain[2], rtol=0, atol=0)
    for j, i in enumerate(idx):
        box = erase_box(erasing_generator(synthetic.split_seed("train", 3, 0, i)), SIZE, SIZE, 1.0)
        top, left, h, w = box
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert bool((inp[j][:, inside] == 0).all())
        torch.testing.assert_close(inp[j][:, ~inside], plain[0][j][:, ~inside], rtol=0, atol=0)
        assert not torch.equal(inp[j], plain[0][j])
    with pytest.raises(UserError, match="random_erasing=2.0 not in"):
        synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=2.0)
