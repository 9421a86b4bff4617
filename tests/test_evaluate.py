"""cascade.evaluate (the CLI) and the folder path of cascade.metrics, on tiny PNG folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade.data.images import write_png
from cascade.evaluate import main
from cascade.masks import paint_mask
from cascade.metrics import evaluate_arrays, evaluate_dirs, summarize


def make_folders(root: Path, n: int = 3, size: int = 24, prefixed: bool = False) -> list[tuple]:
    """input/ gt/ mask/ PNG folders; with `prefixed`, Flare7K names (input_000000.png, ...)."""
    rng = np.random.default_rng(0)
    items = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pred = np.clip(gt.astype(int) + rng.integers(-15, 16, gt.shape), 0, 255).astype(np.uint8)
        glare = (yy - 12) ** 2 + (xx - 10 - i) ** 2 < 36
        streak = np.abs(yy - xx) < 2 if i != 1 else np.zeros_like(glare)  # image 1: no streak
        mask = paint_mask(streak, glare, (yy - 12) ** 2 + (xx - 10) ** 2 < 4)
        stem = f"{i:06d}"
        for folder, image in (("input", pred), ("gt", gt), ("mask", mask)):
            name = f"{folder}_{stem}" if prefixed else stem
            write_png(root / folder / f"{name}.png", image)
        items.append((stem, pred, gt, mask))
    return items


@pytest.mark.parametrize("prefixed", [False, True])
def test_dirs_equal_arrays(tmp_path: Path, prefixed: bool) -> None:
    items = make_folders(tmp_path, prefixed=prefixed)
    from_dirs = evaluate_dirs(
        tmp_path / "input", tmp_path / "gt", tmp_path / "mask", protocol="flare7k", workers=0,
        progress=False,
    )
    from_arrays = evaluate_arrays(items, protocol="flare7k", workers=0)
    pd.testing.assert_frame_equal(from_dirs, from_arrays)
    assert sorted(from_dirs.image.unique()) == ["000000", "000001", "000002"]
    assert not ((from_dirs.image == "000001") & (from_dirs.region == "streak")).any()


def test_cli_prints_summary_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items = make_folders(tmp_path)
    csv = tmp_path / "out" / "per_image.csv"
    argv = ["--input", str(tmp_path / "input"), "--gt", str(tmp_path / "gt"),
            "--mask", str(tmp_path / "mask"), "--protocol", "flare7k", "--workers", "0",
            "--per-image-csv", str(csv), "--no-progress"]
    summary = main(argv)
    out = capsys.readouterr().out
    expected = summarize(evaluate_arrays(items, protocol="flare7k", workers=0))
    assert summary == expected
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:11]}
    assert lines["psnr_streak"] == f"{expected['psnr_streak']:.2f}"
    assert lines["ssim_glare"] == f"{expected['ssim_glare']:.4f}"
    assert lines["score"] == f"{expected['score']:.2f}"
    assert lines["n_images"] == "3"
    assert "protocol: flare7k (SSIM window: uniform)" in out
    back = pd.read_csv(csv, dtype={"image": str})
    assert list(back.columns) == ["image", "region", "metric", "value"]
    assert summarize(back, protocol="flare7k")["psnr_glare"] == pytest.approx(expected["psnr_glare"])


def test_cli_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folders(tmp_path)
    (tmp_path / "mask" / "000002.png").unlink()
    base = ["--input", str(tmp_path / "input"), "--gt", str(tmp_path / "gt"), "--workers", "0"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--mask", str(tmp_path / "mask")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {tmp_path / 'mask'}: no mask image for gt 000002.png"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--mask", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_cli_names_the_image_with_a_bad_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folders(tmp_path)
    write_png(tmp_path / "input" / "000001.png", np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "input"), "--gt", str(tmp_path / "gt"),
              "--mask", str(tmp_path / "mask"), "--workers", "0", "--no-progress"])
    assert capsys.readouterr().err.startswith("error: image '000001': shapes differ")


def test_help_lists_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m cascade.evaluate")
    for word in ("{masked,flare7k}", "{uniform,gaussian}", "--per-image-csv", "--workers N",
                 "no area normalisation", "Score"):
        assert word in " ".join(out.split())  # argparse wraps lines


def test_evaluate_model_scores_what_predict_yields(tmp_path: Path) -> None:
    """A model in memory (what a trial evaluates): predict runs it in eval mode on each test
    image; evaluate_model scores exactly those predictions and keeps the first n_samples."""
    import torch

    from cascade.config import TrialConfig
    from cascade.data.images import to_tensor, to_uint8
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import evaluate_model, predict
    from cascade.uformer import Uformer

    make_folders(tmp_path, size=32)
    testset = PairedTestSet(tmp_path)
    torch.manual_seed(0)
    model = Uformer(img_size=32, embed_dim=8, depths=(1,) * 9).train()
    items = list(predict(model, testset, torch.device("cpu")))
    assert not model.training  # stochastic depth off while predicting
    with torch.no_grad():
        direct = to_uint8(model(to_tensor(testset[1].input)[None])[0, :3])
    assert [stem for stem, *_ in items] == ["000000", "000001", "000002"]
    assert np.array_equal(items[1][1], direct) and np.array_equal(items[1][2], testset[1].gt)
    cfg = TrialConfig.from_dict({"protocol": "flare7k", "eval_workers": 0, "n_samples": 2})
    per_image, samples = evaluate_model(model, testset, cfg, torch.device("cpu"))
    pd.testing.assert_frame_equal(per_image, evaluate_arrays(items, protocol="flare7k", workers=0))
    assert [stem for stem, _ in samples] == ["000000", "000001"]
    assert np.array_equal(samples[1][1], direct)
