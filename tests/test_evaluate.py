"""cascade.evaluate (the CLI) and the folder path of cascade.metrics, on tiny PNG folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade.data.images import write_png
from cascade.evaluate import LPIPSSetup, main
from cascade.masks import paint_mask
from cascade.metrics import evaluate_arrays, evaluate_dirs, summarize

NO_LPIPS = LPIPSSetup(None, "flare7k", "no weights in this test")  # LPIPS off, by its reason


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
    items = list(predict(model, testset, torch.device("cpu"), "flare7kpp"))
    assert not model.training  # stochastic depth off while predicting
    with torch.no_grad():
        direct = to_uint8(model(to_tensor(testset[1].input)[None])[0, :3])
    assert [stem for stem, *_ in items] == ["000000", "000001", "000002"]
    assert np.array_equal(items[1][1], direct) and np.array_equal(items[1][2], testset[1].gt)
    cfg = TrialConfig.from_dict({"protocol": "flare7k", "eval_workers": 0, "n_samples": 2})
    per_image, samples = evaluate_model(model, testset, cfg, torch.device("cpu"), NO_LPIPS)
    pd.testing.assert_frame_equal(per_image, evaluate_arrays(items, protocol="flare7k", workers=0))
    assert [stem for stem, _ in samples] == ["000000", "000001"]
    assert np.array_equal(samples[1][1], direct)


# -- the official output per base kind, LPIPS --------------------------------------------------------

def light_folders(root: Path, size: int = 48) -> None:
    """input/ gt/ mask/ with one saturated light (channel mean 1 > 0.97) in every input."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    for i in range(2):
        inp = rng.integers(20, 120, (size, size, 3), dtype=np.uint8)
        inp[(yy - 20 - i) ** 2 + (xx - 24) ** 2 < 30] = 255
        gt = (inp // 2).astype(np.uint8)
        mask = paint_mask(np.zeros((size, size), bool), (yy - 20) ** 2 + (xx - 24) ** 2 < 60,
                          (yy - 20) ** 2 + (xx - 24) ** 2 < 30)
        for folder, image in (("input", inp), ("gt", gt), ("mask", mask)):
            write_png(root / folder / f"{i:06d}.png", image)


def tiny_uformer():
    import torch

    from cascade.uformer import Uformer

    torch.manual_seed(0)
    return Uformer(img_size=48, embed_dim=8, depths=(1,) * 9).eval()


@pytest.mark.parametrize("base_kind", ["flare7k", "flare7kpp"])
def test_predict_takes_the_official_path_of_the_base_kind(tmp_path: Path, base_kind: str) -> None:
    """v1 (flare7k): the input's light source blended back (test.py:97); ++: channels 0:3."""
    import torch

    from cascade.data.images import to_tensor, to_uint8
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import predict
    from cascade.model import blend_light_source, light_source_mask

    light_folders(tmp_path)
    testset = PairedTestSet(tmp_path)
    model = tiny_uformer()
    (stem, pred, _, _), *_ = predict(model, testset, torch.device("cpu"), base_kind)
    x = to_tensor(testset[0].input)[None]
    with torch.no_grad():
        raw = model(x)[:, :3]
    blended = to_uint8(blend_light_source(x, raw)[0])
    assert light_source_mask(x[0]).max() == 1.0  # the light is there to be blended
    assert not np.array_equal(blended, to_uint8(raw[0]))
    assert np.array_equal(pred, blended if base_kind == "flare7k" else to_uint8(raw[0]))


def test_large_mode_goes_through_test_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cascade import model as model_module
    from cascade.config import TrialConfig
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import evaluate_model

    light_folders(tmp_path)
    calls: list[float | None] = []
    real = model_module.flare7k_large

    def spy(model, image, light_threshold=None):
        calls.append(light_threshold)
        return real(model, image, light_threshold)

    monkeypatch.setattr(model_module, "flare7k_large", spy)
    cfg = TrialConfig.from_dict({"eval_mode": "flare7k-large", "eval_workers": 0, "n_samples": 0,
                                 "checkpoint": "/c.pth", "base_kind": "flare7k"})
    evaluate_model(tiny_uformer(), PairedTestSet(tmp_path), cfg, torch.device("cpu"), NO_LPIPS)
    assert calls == [0.95, 0.95]  # test_large.py:159's threshold, once per image


def use_random_lpips(monkeypatch: pytest.MonkeyPatch):
    """Make LPIPS 'available' with a seeded random AlexNet trunk (no weights file needed); returns
    the patched builder, whose scorers all have the same weights."""
    import torch

    from cascade import lpips_score

    real = lpips_score.build_lpips

    def build(weights=None, device="cpu", random_trunk=False):
        torch.manual_seed(7)
        return real(None, device=device, random_trunk=True)

    monkeypatch.setattr(lpips_score, "lpips_available", lambda weights=None: True)
    monkeypatch.setattr(lpips_score, "build_lpips", build)
    return build


@pytest.fixture
def random_lpips(monkeypatch: pytest.MonkeyPatch):
    return use_random_lpips(monkeypatch)


@pytest.mark.parametrize("convention", ["flare7k", "standard"])
def test_lpips_rows_and_summary_when_weights_exist(tmp_path: Path, random_lpips, convention: str) -> None:
    import torch

    from cascade.config import TrialConfig
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import evaluate_model, evaluation_summary

    light_folders(tmp_path)
    testset = PairedTestSet(tmp_path)
    cfg = TrialConfig.from_dict({"eval_workers": 0, "n_samples": 2, "lpips": convention})
    per_image, samples = evaluate_model(tiny_uformer(), testset, cfg, torch.device("cpu"))
    rows = per_image[per_image["metric"] == "lpips"]
    assert rows["region"].tolist() == ["entire", "entire"] and rows["image"].tolist() == ["000000", "000001"]
    scorer = random_lpips()  # the same seeded weights
    direct = [scorer(pred, testset[i].gt, convention) for i, (_, pred) in enumerate(samples)]
    assert rows["value"].tolist() == pytest.approx(direct, abs=1e-6) and min(direct) > 0
    summary = evaluation_summary(per_image)
    assert summary["lpips_entire"] == pytest.approx(np.mean(direct), abs=1e-6)
    assert (summary["lpips"], summary["lpips_weights_source"], summary["lpips_reason"]) == (
        convention, "random", None)
    assert summary["lpips_fingerprint"] == scorer.fingerprint
    # PSNR/SSIM unchanged by the extra rows
    plain = evaluate_arrays([(s, p, testset[i].gt, testset[i].mask) for i, (s, p) in enumerate(samples)],
                            protocol="masked", workers=0)
    assert summary["psnr_entire"] == summarize(plain)["psnr_entire"] and summary["n_images"] == 2


def test_no_lpips_weights_is_a_reason_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cascade.config import TrialConfig
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import evaluate_model, evaluation_summary, prepare_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # nothing cached
    light_folders(tmp_path / "set")
    cfg = TrialConfig.from_dict({"eval_workers": 0})
    setup = prepare_lpips(cfg, "cpu")
    assert setup.scorer is None and "no AlexNet trunk weights offline" in setup.reason
    assert "set lpips_weights" in setup.reason and "$TORCH_HOME/hub/checkpoints" in setup.reason
    assert str(tmp_path) not in setup.reason  # results name no machine's paths
    per_image, _ = evaluate_model(tiny_uformer(), PairedTestSet(tmp_path / "set"), cfg,
                                  torch.device("cpu"))
    assert not (per_image["metric"] == "lpips").any()
    summary = evaluation_summary(per_image)
    assert summary["lpips_entire"] is None and summary["lpips_reason"] == setup.reason
    assert summary["lpips"] == "flare7k" and summary["lpips_fingerprint"] is None


def test_a_named_lpips_weights_file_must_be_usable(tmp_path: Path) -> None:
    from cascade.config import TrialConfig
    from cascade.errors import UserError
    from cascade.evaluate import prepare_lpips

    missing = tmp_path / "alexnet.pth"
    with pytest.raises(UserError, match=rf"^lpips_weights='{missing}': {missing} does not exist"):
        prepare_lpips(TrialConfig.from_dict({"lpips_weights": str(missing)}), "cpu")
    missing.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match=r"^lpips_weights=.*cannot read .* as a state dict"):
        prepare_lpips(TrialConfig.from_dict({"lpips_weights": str(missing)}), "cpu")


def test_lpips_needs_images_of_31_px(tmp_path: Path, random_lpips) -> None:
    from cascade.evaluate import lpips_rows

    img = np.zeros((24, 40, 3), np.uint8)
    rows, used = lpips_rows([("a", img, img, img)], LPIPSSetup(random_lpips(), "flare7k"))
    assert rows == [] and used.scorer is None and "smaller than 31 px" in used.reason
