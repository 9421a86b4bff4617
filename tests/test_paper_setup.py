"""search_spaces/table1.yaml as the paper ran it, end to end on a fake Flare7K v1 tree (CPU, tiny
sizes): the trials, the control row, the table's caption and the reference check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cascade.data.images import write_png
from cascade.masks import paint_mask

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64  # test images; the evaluation views are EVAL px


def _blob(side: int, radius: float, level: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] - side / 2 + 0.5
    v = level * np.exp(-(xx**2 + yy**2) / (2 * radius**2))
    return np.repeat(v[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


def v1_tree(root: Path) -> dict[str, Path]:
    """The v1 release's layout: Flare7k/Scattering_Flare/{Compound_Flare, Light_Source} (which the
    v1 loader does not read), Reflective_Flare, test_data/real/{input, gt} without masks; the
    masked test images as the Flare7K++ download has them; Flickr24K backgrounds."""
    data = root / "Flare7k"
    for k in range(2):
        write_png(data / "Scattering_Flare/Compound_Flare" / f"f{k}.png", _blob(512, 60 + 20 * k, 255))
        write_png(data / "Scattering_Flare/Light_Source" / f"f{k}.png", _blob(512, 10, 255))
    write_png(data / "Reflective_Flare/r0.png", _blob(512, 40, 80))
    rng = np.random.default_rng(0)
    for k in range(4):
        write_png(root / "Flickr24K" / f"b{k}.png", rng.integers(0, 200, (80, 90, 3), dtype=np.uint8))
    test = root / "Flare7Kpp/test_data/real"
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for k in range(3):
        gt = rng.integers(20, 120, (SIDE, SIDE, 3), dtype=np.uint8)
        flare = _blob(SIDE, 8 + 2 * k, 200)
        write_png(test / "gt" / f"{k:03d}.png", gt)
        write_png(test / "input" / f"{k:03d}.png", np.clip(gt.astype(int) + flare, 0, 255).astype(np.uint8))
        r = np.hypot(yy - SIDE / 2, xx - SIDE / 2)
        write_png(test / "mask" / f"{k:03d}.png",
                  paint_mask(streak=(abs(yy - SIDE / 2) < 2) & (r < 20), glare=r < 12, light=r < 3))
        write_png(data / "test_data/real/input" / f"{k:03d}.png", gt)  # v1: no mask folder
        write_png(data / "test_data/real/gt" / f"{k:03d}.png", gt)
    return {"data": data, "backgrounds": root / "Flickr24K", "test_data": test}


def tiny_table1(tmp_path: Path) -> Path:
    """table1.yaml with its settings kept and only its sizes (and the encoder: no weights offline)
    made tiny."""
    space = yaml.safe_load((ROOT / "search_spaces" / "table1.yaml").read_text())
    space["fixed"].update(steps=2, batch_size=2, crop=32, eval_size=32, encoder="small_cpu",
                          encoder_pretrained=False, device="cpu", num_workers=0, eval_workers=0,
                          n_samples=1, log_every=1, checkpoint_every=2)
    space["grid"] = {"k": [2], "lambda_": [1.0, 0.6]}
    space.update(seeds=[0], resources={"cpu": 1, "gpu": 0}, max_concurrent=2)
    path = tmp_path / "table1_tiny.yaml"
    path.write_text("# Table 1 as the paper ran it, tiny (a test space)\n" + yaml.safe_dump(space))
    return path


def test_table1_yaml_is_the_paper_as_written():
    fixed = yaml.safe_load((ROOT / "search_spaces" / "table1.yaml").read_text())["fixed"]
    assert (fixed["base_kind"], fixed["data_loader"], fixed["encoder"]) == (
        "flare7k", "flare7k", "vit_l16_swag_e2e")
    assert (fixed["random_erasing_on"], fixed["eval_mode"], fixed["eval_size"]) == (
        "background", "resize-bilinear", 128)
    assert (fixed["optimizer"], fixed["lr"], fixed["delta"], fixed["crop"]) == ("sgd", 1e-3, 1e-3, 128)
    pp = yaml.safe_load((ROOT / "search_spaces" / "table1_flare7kpp.yaml").read_text())["fixed"]
    assert (pp["base_kind"], pp["random_erasing_on"], pp["eval_mode"], pp["encoder"]) == (
        "flare7kpp", "input", "native", "vit_l16_swag")


@pytest.mark.slow
def test_fake_v1_tree_runs_table1_with_its_control_and_reference_check(ray_session, tmp_path):
    import sweep
    from cascade.uformer import Uformer, save_checkpoint
    from orchestrator.space import load_space
    from reports import reference_check

    paths = v1_tree(tmp_path)
    ckpt = tmp_path / "net_g_last.pth"
    save_checkpoint(Uformer(img_size=32, embed_dim=8, depths=(1,) * 9), ckpt)
    space_file = tiny_table1(tmp_path)
    inputs = {"data": str(paths["data"]), "backgrounds": str(paths["backgrounds"]),
              "test_data": str(paths["test_data"]), "checkpoint": str(ckpt)}
    space = load_space(space_file, **inputs)
    assert [c.kind for c in space.cells] == ["reference", "control", "cascade", "cascade"]
    results = tmp_path / "results"
    assert sweep.run_sweep(space, sweep.RunOptions(results=results)).left == 0

    written = sweep.table1(space_file, results, **inputs)
    folder = results / "table1" / "masked_resize-bilinear32"
    assert folder / "table1.csv" in written
    table = pd.read_csv(folder / "table1.csv")
    assert list(table["method"]) == ["reference", "control", "cascade", "cascade"]
    assert table["status"].eq("done").all()
    ours = table[table["method"] == "cascade"]
    assert set(ours["data_loader"]) == {"flare7k"}  # the v1 loader, although Light_Source exists
    assert set(ours["random_erasing_on"]) == {"background"} and set(table["eval_mode"]) == {"resize-bilinear"}
    assert set(ours["training"]) == {"SGD, lr 0.001, momentum 0, weight decay 0, constant schedule, "
                                     "2 steps x 2 crops of 32 px (Flare7K v1 loader)"}
    diffs = pd.read_csv(folder / "diff.csv")
    assert "control" in set(diffs["method"])
    tex = (folder / "table1.tex").read_text()
    assert "Cascade, 0 steps (control)" in tex and "resized to 32x32 px, bilinear" in tex
    assert "of the background, before the flare is added" in tex
    # The control is the base applied twice: never the reference's numbers.
    ref, ctl = table.iloc[0], table.iloc[1]
    assert ref["psnr_entire"] != ctl["psnr_entire"]

    compared = reference_check.main([
        "--space", str(space_file), "--results", str(results), "--eval-size", "32",
        *[a for k, v in inputs.items() for a in (f"--{k.replace('_', '-')}", v)]])
    assert len(compared) == 8 * 2 and compared["nearest"].sum() == 1
    assert compared["distance"].dropna().is_monotonic_increasing  # nearest first (NaN: a region missing)
    md = (results / "table1" / "reference_check.md").read_text()
    assert "| paper (Song & Bae, Table 1) | 23.74 | 30.28 | 27.79 | 0.8692 | 0.9646 | 0.9269 | |" in md
    assert "resize-area@32 / masked" in md and "native / flare7k" in md and "Nearest: " in md
    # The reference row of the sweep is one of the readings, exactly.
    row = compared[(compared["eval_mode"] == "resize-bilinear") & (compared["protocol"] == "masked")]
    assert row["psnr_entire"].item() == pytest.approx(ref["psnr_entire"], abs=1e-9)


def test_reference_check_compares_sorts_and_names_readings_without_numbers():
    from reports import reference_check as rc

    paper = rc.paper_reference()
    near = {m: paper[m] + (0.1 if m.startswith("psnr") else 0.001) for m in paper}
    far = {m: paper[m] + (2.0 if m.startswith("psnr") else 0.02) for m in paper}
    measured = pd.DataFrame([
        {"eval_mode": "tiles", "eval_size": 128, "protocol": "masked", **far, "reason": None},
        {"eval_mode": "native", "eval_size": None, "protocol": "flare7k", **near, "reason": None},
        {"eval_mode": "center-crop", "eval_size": 128, "protocol": "masked",
         **dict.fromkeys(paper), "reason": "eval_mode=center-crop: too small"}])
    out = rc.compare(measured, paper)
    assert list(out["eval_mode"]) == ["native", "tiles", "center-crop"]  # nearest first, NaN last
    assert out["distance"].iloc[0] == pytest.approx(0.1) and out["distance"].iloc[1] == pytest.approx(2.0)
    assert list(out["nearest"]) == [True, False, False] and np.isnan(out["distance"].iloc[2])
    text = rc.markdown(out, paper, "test")
    assert "Nearest: native / flare7k, distance 0.10" in text
    assert "Not measured: center-crop (eval_mode=center-crop: too small)." in text


def test_view_sizes_and_null_loader_fail_early_and_keep_ids():
    from cascade.config import TrialConfig
    from cascade.errors import UserError
    from orchestrator import identity

    with pytest.raises(UserError, match="eval_mode=tiles cuts eval_size=128 px views from the "
                                        "procedural test images of test_size=64"):
        TrialConfig.from_dict({"eval_mode": "tiles", "test_size": 64})
    TrialConfig.from_dict({"eval_mode": "resize-area", "test_size": 64})  # a resize is fine
    # data_loader null is the by-layout rule every trial used before the field: not in the id.
    cfg = TrialConfig.from_dict({"data": "/d", "backgrounds": "/b"})
    inputs = {"version": 1}
    assert identity.training_key(cfg, inputs) != identity.training_key(
        cfg.replace(data_loader="flare7k"), inputs)
    values = {f: cfg.to_dict()[f] for f in identity.training_fields() if f != "data_loader"}
    from cascade.io import digest

    assert identity.training_key(cfg, inputs) == digest({"fields": {
        f: v for f, v in values.items() if f not in ("random_erasing_on",)}, "inputs": inputs})
