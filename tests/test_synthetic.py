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
    r = synthetic.ProceduralPairs(32, seed=7).render([0, 1, 2])
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
    bank = synthetic._scene_bank(64)
    assert bank.shape == (len(synthetic.SKIMAGE_SCENES), 3, 64, 64)
    assert float(bank.min()) >= 0 and float(bank.max()) <= 1


def test_random_erasing_changes_input_only(pairs: synthetic.ProceduralPairs) -> None:
    idx = [0, 5, 2]
    plain = pairs.batch(idx)
    off = synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=0.0).batch(idx)
    for x, y in zip(plain, off):  # p = 0: exactly today's pairs
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    inp, gt, flare = synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=1.0).batch(idx)
    torch.testing.assert_close(gt, plain[1], rtol=0, atol=0)
    torch.testing.assert_close(flare, plain[2], rtol=0, atol=0)
    for j, i in enumerate(idx):
        box = erase_box(erasing_generator(synthetic.sample_seed(3, i)), SIZE, SIZE, 1.0)
        top, left, h, w = box
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert bool((inp[j][:, inside] == 0).all())
        torch.testing.assert_close(inp[j][:, ~inside], plain[0][j][:, ~inside], rtol=0, atol=0)
        assert not torch.equal(inp[j], plain[0][j])
    with pytest.raises(UserError, match="random_erasing=2.0 not in"):
        synthetic.ProceduralPairs(SIZE, seed=3, random_erasing=2.0)
