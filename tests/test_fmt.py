"""cascade.fmt: durations and PSNR summaries as log and progress lines print them."""

from __future__ import annotations

import pytest

from cascade.fmt import duration, psnr_text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (42, "42s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3599.4, "59m59s"),
    (3600, "1h00m"), (7440, "2h04m"), (7500, "2h05m"), (90061, "25h01m"), (-3, "0s"),
])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_psnr_text_known_values() -> None:
    metrics = {"psnr_entire": 22.2149, "psnr_streak": 29.765, "psnr_glare": 31.44, "ssim_entire": 0.8}
    assert psnr_text(metrics) == "PSNR entire 22.21"
    assert psnr_text(metrics, ("entire", "streak", "glare")) == "PSNR entire 22.21 streak 29.77 glare 31.44"
    assert psnr_text({"psnr_entire": 30}) == "PSNR entire 30.00"


def test_psnr_text_leaves_out_what_is_not_a_finite_number() -> None:
    metrics = {"psnr_entire": float("nan"), "psnr_streak": float("inf"), "psnr_glare": "31.4",
               "psnr_global": True, "psnr_score": None, "psnr_x": 20.0}
    assert psnr_text(metrics, ("entire", "streak", "glare", "global", "score", "missing")) == ""
    assert psnr_text(metrics, ("entire", "x")) == "PSNR x 20.00"
    assert psnr_text({}) == ""
