"""Tests for cascade.data.views: the 128 px readings of the paper's evaluation, on known images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cascade import config
from cascade.data import views
from cascade.data.testset import TestItem
from cascade.errors import UserError

RESIZES = [m for m in views.VIEWS if m.startswith("resize-")]


def _item(h: int = 64, w: int = 64, seed: int = 0) -> TestItem:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w, 3), np.uint8)
    mask[: h // 2] = (255, 0, 0)  # streak in the top half
    return TestItem("img", image, image[::-1].copy(), mask)


def test_names_match_the_config():
    assert tuple(views.VIEWS) == config.VIEW_MODES
    assert config.EVAL_MODES == config.INFERENCE_MODES + config.VIEW_MODES


@pytest.mark.parametrize("mode", list(views.VIEWS))
def test_a_constant_image_stays_constant(mode):
    # Every filter's weights sum to 1 and every crop copies pixels: a flat image stays flat, exactly
    # (uint8 -> filter -> round gives back the level; bicubic's negative lobes cancel on a constant).
    flat = np.full((64, 48, 3), 173, np.uint8)
    item = TestItem("c", flat, flat, np.full((64, 48, 3), (255, 255, 0), np.uint8))
    out = views.views(item, mode, 16)
    assert out and all(v.input.shape == (16, 16, 3) and v.input.dtype == np.uint8 for v in out)
    for v in out:
        assert (v.input == 173).all() and (v.gt == 173).all()
        assert (v.mask == (255, 255, 0)).all()


def test_center_crop_and_tile_positions_are_known():
    item = _item(64, 64)
    (crop,) = views.views(item, "center-crop", 16)
    assert np.array_equal(crop.input, item.input[24:40, 24:40])  # (64 - 16) / 2 = 24
    assert np.array_equal(crop.gt, item.gt[24:40, 24:40]) and crop.stem == "img"
    tiles = views.views(item, "tiles", 16)
    assert [t.stem for t in tiles[:5]] == ["img@r0c0", "img@r0c1", "img@r0c2", "img@r0c3", "img@r1c0"]
    assert len(tiles) == 16
    assert np.array_equal(tiles[6].input, item.input[16:32, 32:48])  # row 1, column 2
    assert np.array_equal(tiles[6].mask, item.mask[16:32, 32:48])
    # A side that is no multiple of the tile: a centred grid; odd offsets round like CenterCrop.
    assert views.tile_grid(40, 70, 16) == [(r, c, 4 + 16 * r, 3 + 16 * c)
                                           for r in range(2) for c in range(4)]
    assert views.center_offset(41, 16) == 12  # round(12.5) = 12, as torchvision's CenterCrop
    stitched = views.stitch(64, 64, 16, {t.stem: t.input for t in tiles})
    assert np.array_equal(stitched, item.input)


def test_resizes_follow_their_filters():
    from PIL import Image

    item = _item(64, 64)
    (area,) = views.views(item, "resize-area", 16)
    # Box filter at an integer factor: the mean of each 4 x 4 block. PIL filters rows, rounds to
    # 8 bits, then filters columns and rounds again: two roundings of at most 0.5 level each.
    blocks = item.input.reshape(16, 4, 16, 4, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(area.input.astype(np.float64) - blocks).max() <= 1.0
    (bilinear,) = views.views(item, "resize-bilinear", 16)
    expected = np.asarray(Image.fromarray(item.input).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(bilinear.input, expected)
    (noaa,) = views.views(item, "resize-bilinear-noaa", 16)
    # Without antialiasing at a factor of 4 each output pixel (centre at 4j + 1.5) reads pixels
    # 4j + 1 and 4j + 2 with weights 1/2: the mean of the 2 x 2 block there.
    two = item.input.astype(np.float64)[1::4][:, :, :][:, 1::4] + item.input.astype(np.float64)[2::4][:, 2::4]
    two += item.input.astype(np.float64)[1::4][:, 2::4] + item.input.astype(np.float64)[2::4][:, 1::4]
    assert np.abs(noaa.input.astype(np.float64) - two / 4).max() <= 0.5 + 1e-9
    assert not np.array_equal(noaa.input, bilinear.input)
    # The mask goes through the same filter: the top half stays streak, the bottom not.
    assert (bilinear.mask[:7] == (255, 0, 0)).all() and (bilinear.mask[9:] == 0).all()


def test_crops_refuse_small_images_and_unknown_modes():
    with pytest.raises(UserError, match="eval_mode=tiles: test image img is 40x40 px, smaller than eval_size=64"):
        views.views(_item(40, 40), "tiles", 64)
    with pytest.raises(UserError, match="expected one of resize-bilinear"):
        views.views(_item(), "native", 16)
    assert len(views.views(_item(40, 40), "resize-bicubic", 64)) == 1  # resizes go up as well


def test_image_means_average_tiles_that_have_the_region():
    rows = pd.DataFrame({"image": ["a@r0c0", "a@r0c1", "a@r0c0", "b"],
                         "region": ["entire", "entire", "streak", "entire"],
                         "metric": ["psnr", "psnr", "psnr", "ssim"],
                         "value": [20.0, np.inf, 30.0, 0.5]})
    rows.attrs["protocol"] = "masked"
    out = views.image_means(rows).set_index(["image", "region", "metric"])["value"]
    from cascade.metrics import PSNR_CAP_DB

    assert out[("a", "entire", "psnr")] == (20.0 + PSNR_CAP_DB) / 2  # +inf capped first
    assert out[("a", "streak", "psnr")] == 30.0  # the tile without a streak row is skipped
    assert out[("b", "entire", "ssim")] == 0.5
    assert views.image_means(rows).attrs["protocol"] == "masked"
