"""Flare7K mask convention decodes to the intended soft regions."""

import numpy as np
import pytest

from cascade.masks import MASK_COLOURS, paint_mask, region_weights


def test_pure_colours_decode_to_their_region():
    mask = np.array([[MASK_COLOURS["glare"], MASK_COLOURS["streak"], MASK_COLOURS["light"], MASK_COLOURS["other"]]],
                    dtype=np.uint8)
    w = region_weights(mask)
    np.testing.assert_array_equal(w["glare"][0], [1, 0, 0, 0])
    np.testing.assert_array_equal(w["streak"][0], [0, 1, 0, 0])
    np.testing.assert_array_equal(w["light"][0], [0, 0, 1, 0])
    np.testing.assert_array_equal(w["global"][0], [1, 1, 0, 1])


def test_paint_then_decode_round_trip():
    rng = np.random.default_rng(0)
    streak, glare, light = (rng.random((8, 8)) > 0.6 for _ in range(3))
    w = region_weights(paint_mask(streak, glare, light))
    np.testing.assert_array_equal(w["light"] == 1, light)
    np.testing.assert_array_equal(w["streak"] == 1, streak & ~light)
    np.testing.assert_array_equal(w["glare"] == 1, glare & ~streak & ~light)


def test_antialiased_border_is_fractional():
    w = region_weights(np.array([[[255, 128, 0]]], dtype=np.uint8))  # between streak and glare
    assert w["streak"][0, 0] == pytest.approx(127 / 255)
    assert w["glare"][0, 0] == pytest.approx(128 / 255)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"mask must be \(H, W, 3\)"):
        region_weights(np.zeros((4, 4), dtype=np.uint8))
