"""What the embedded default measures (issue 20): the checks behind docs/performance.md "The
embedded default" and the README's demo paragraph. Prints one block per check.

    python bench/demo_check.py noise                      # SSIM ceiling that noise alone leaves
    python bench/demo_check.py base                       # the demo's base against identity
    python bench/demo_check.py encoder                    # the demo encoder's held-out IoU
    python bench/demo_check.py budget                     # the base's second pass: idempotence gap
    python bench/demo_check.py budget --sweep-dir DIR     # + lambda_=1 cells vs the cascade at 0 steps
    python bench/demo_check.py power --sweep-dir DIR      # minimum detectable differences
    python bench/demo_check.py readme --sweep-dir DIR     # the README's demo table from DIR

`base`, `encoder` and `budget` build what is missing (cached, as `make sweep` does; set
FLARESWEEP_CACHE to use a private cache). `budget` prints the idempotence gap recorded in
base.json (cascade.pretrain.base_quality: the cascade at 0 steps against the reference, PSNR and
SSIM over the entire image, and whether it is within the bounds; exit status 1 when not); with
--sweep-dir it pairs the finished lambda_=1 trials of DIR per image with the sweep's control
trials (the cascade at 0 steps), or, in a sweep without them, with one 0-step run into
DIR-zero_steps (cascade.train.train with steps=0) (reports.stats).
Not a bench_*.py: it measures quality, not speed (and `--sweep-dir` wants a finished demo sweep).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "search_spaces" / "demo.yaml"


def demo_config(**changes: object) -> object:
    """The demo space's fixed config (a cascade trial, seed 0) with `changes`."""
    from cascade.config import TrialConfig
    from cascade.io import parse_yaml

    fixed = parse_yaml(DEMO.read_text())["fixed"]
    return TrialConfig.from_dict({**fixed, "k": 1, "lambda_": 1.0, **changes})


def check_noise(n: int = 48, size: int = 64) -> None:
    """SSIM of the noise-free ground truth against the noisy one, on the demo's test split, under
    the camera models compared in cascade/data/synthetic.py's docstring."""
    import torch

    from cascade.data import synthetic as S
    from cascade.data.testset import TEST_SEED
    from cascade.metrics import ssim_map

    pairs = S.ProceduralPairs(size, TEST_SEED, split="test")
    idx = list(range(n))
    p = S._stack([pairs._params(s) for s in pairs.sample_seeds(idx)], torch.device("cpu"))
    psfs, scenes, noise = pairs._banks(torch.device("cpu"))
    light, _, _ = pairs._lights_and_scatter(p, psfs)
    clean = pairs._scene(p, scenes, torch.zeros_like(noise))  # night radiance, no noise
    gamma = p["gamma"].view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(clean.shape, generator=g)

    def encode(x: torch.Tensor) -> np.ndarray:
        return ((x + light).clamp(0, 1) ** (1 / gamma) * 255).round().byte().permute(0, 2, 3, 1).numpy()

    def ceiling(noisy: torch.Tensor) -> float:
        a, b = encode(clean), encode(noisy.clamp(min=0))
        return float(np.mean([ssim_map(x, y)[0] for x, y in zip(a, b)]))

    sigma = p["sigma"].view(-1, 1, 1, 1)
    ours = pairs._scene(p, scenes, noise)
    night = clean + sigma * z  # Flare7K's sigma added to the night radiance itself
    # The generator before issue 20: shot U(0.0005, 0.004) x signal + read U(0.001, 0.006)^2.
    shot = 0.0005 + 0.0035 * torch.rand(n, 1, 1, 1, generator=g)
    read = 0.001 + 0.005 * torch.rand(n, 1, 1, 1, generator=g)
    old = clean + torch.sqrt(shot * clean + read**2) * z
    # Flare7K itself: its noise and gain on a normally exposed background (no night cut).
    photo = scenes[torch.randint(0, scenes.shape[0], (n,), generator=g)]
    photo = torch.nn.functional.interpolate(photo, size=(size, size), mode="area")
    gain = p["gain"].view(-1, 1, 1, 1)
    f_clean = (photo * gain).clamp(0, 1)
    f_noisy = ((photo + sigma * z).clamp(0, 1) * gain)

    def plain(x: torch.Tensor) -> np.ndarray:
        return (x.clamp(0, 1) ** (1 / gamma) * 255).round().byte().permute(0, 2, 3, 1).numpy()

    flare7k = float(np.mean([ssim_map(x, y)[0] for x, y in zip(plain(f_clean), plain(f_noisy))]))
    print(f"noise: SSIM(noise-free gt, noisy gt), {n} test-split images at {size} px")
    print(f"  ours (Flare7K's sigma and gain at the normal exposure, then night): {ceiling(ours):.3f}")
    print(f"  Flare7K's sigma added to the night radiance:                        {ceiling(night):.3f}")
    print(f"  the generator before issue 20 (shot/read noise on the night scene):  {ceiling(old):.3f}")
    print(f"  Flare7K on normally exposed photographs (its own setting):           {flare7k:.3f}")


def check_base() -> None:
    """The demo base's quality record (base.json), building the base if needed."""
    from cascade import pretrain

    cfg = demo_config()
    path = pretrain.ensure_base(cfg)
    meta = json.loads((path.parent / "base.json").read_text())
    print(f"base: {path} (trained {meta['train_s']:.0f} s)")
    print("  " + pretrain.quality_text(meta["quality"]))
    for name in ("identity", "base"):
        q = meta["quality"][name]
        print(f"  {name:8s} PSNR entire {q['psnr_entire']:.2f} dB, outside the masks "
              f"{q['psnr_outside']:.2f} dB; SSIM entire {q['ssim_entire']:.4f}, outside "
              f"{q['ssim_outside']:.4f}")


def check_encoder() -> None:
    """The demo encoder's held-out IoU against its random initialisation."""
    from cascade import demo_encoder

    path = demo_encoder.ensure_demo_encoder()
    meta = json.loads((path.parent / "encoder.json").read_text())
    print(f"encoder: {path} (trained {meta['train_s']:.0f} s)")
    for region in demo_encoder.REGIONS:
        print(f"  {region:7s} held-out IoU {meta['heldout_iou'][region]:.3f}  "
              f"(random init {meta['random_init_iou'][region]:.3f})")
    print(f"  learned: {meta['learned']}")


def check_gap(cfg: object | None = None) -> bool:
    """The idempotence gap of the demo's base (base.json "quality", built if missing): the base
    (the reference row) against the cascade at 0 steps (the base applied to its own output, the
    control row), PSNR and SSIM over the entire image on the demo test set, against the bounds
    `pretrain.MAX_GAP_PSNR_DB` / `MAX_GAP_SSIM`; and the base against identity. True when the gap
    is within them. `cfg`: the demo's (`demo_config()`) unless given."""
    from cascade import pretrain

    cfg = demo_config() if cfg is None else cfg
    path = pretrain.ensure_base(cfg)
    meta = json.loads((path.parent / "base.json").read_text())
    quality = meta["quality"]
    base, second, identity, gap = (quality[k] for k in ("base", "second_pass", "identity", "gap"))
    within = quality["idempotent"]
    print(f"budget: the second pass of the base {path} (trained {meta['train_s']:.0f} s), "
          f"{base['n_images']} test images, entire image")
    rows = (("reference (the base)", base), ("cascade at 0 steps (base twice)", second),
            ("identity (input as output)", identity))
    for name, q in rows:
        print(f"  {name:32s} PSNR {q['psnr_entire']:6.2f} dB, SSIM {q['ssim_entire']:.4f}, "
              f"SSIM outside the masks {q['ssim_outside']:.4f}")
    print(f"  idempotence gap (reference - cascade at 0 steps): PSNR {gap['psnr_entire']:+.3f} dB "
          f"(at most {pretrain.MAX_GAP_PSNR_DB:g}), SSIM {gap['ssim_entire']:+.4f} (at most "
          f"{pretrain.MAX_GAP_SSIM:g}): {'within the bounds' if within else 'NOT within the bounds'}")
    print(f"  deflares (>= {pretrain.MIN_PSNR_GAIN_DB:g} dB over identity, higher SSIM, SSIM outside "
          f"the masks >= identity's): {'yes' if quality['deflares'] else 'NO'}")
    return bool(within)


def check_budget(sweep_dir: Path | None) -> bool:
    """`check_gap`; with `sweep_dir`, also its lambda_=1 cells against the cascade at 0 steps,
    paired per image (95 % CIs): the sweep's control trials of the same seed where it has them,
    else one 0-step run into DIR-zero_steps. True when the gap is within its bounds."""
    within = check_gap()
    if sweep_dir is None:
        return within
    import pandas as pd

    from cascade.train import train
    from reports import stats
    from reports.collect import load_sweep

    sweep = load_sweep(sweep_dir)
    done = sweep.cells[sweep.cells["status"] == "done"]
    controls = done[done["kind"] == "control"]
    if len(controls):
        references = {(int(s) if pd.notna(s) else None): t
                      for s, t in zip(controls["seed"], controls["trial_id"])}
        per_image, where = sweep.per_image, "the sweep's control trials"
    else:
        out = sweep_dir.parent / f"{sweep_dir.name}-zero_steps"
        if not (out / "per_image.csv").is_file():
            train(demo_config(steps=0), output_dir=out)
        zero = pd.read_csv(out / "per_image.csv", dtype={"image": str}).assign(trial_id="zero-steps")
        zero["image"] = zero["image"].map(lambda s: Path(s).stem)
        references, where = {None: "zero-steps"}, str(out)
        per_image = pd.concat([sweep.per_image, zero], ignore_index=True)
    wide = stats.per_image_wide(per_image)
    cells = done[done["kind"] == "cascade"]
    print(f"budget: lambda_=1 cells minus the cascade at 0 steps ({where}), paired per image")
    for k in (1, 2):
        group = cells[(cells["k"] == k) & np.isclose(cells["lambda_"].astype(float), 1.0)]
        trials = list(dict.fromkeys(
            (t, int(s) if pd.notna(s) and len(controls) else None)
            for t, s in zip(group["trial_id"], group["seed"])))
        if not trials:
            continue
        diffs = stats.paired_differences(wide, trials, references)
        for row in stats.diff_rows(diffs):
            if row["metric"] in ("psnr_entire", "ssim_entire", "psnr_streak", "psnr_glare"):
                moved = "moved" if row["flagged"] else "NOT moved"
                print(f"  k={k} {row['metric']:12s} {row['diff']:+.4f} [{row['ci_low']:+.4f}, "
                      f"{row['ci_high']:+.4f}] over {row['n_images']} images, {len(trials)} seed(s): "
                      f"{moved}")
    return within


def readme_rows(sweep_dir: Path) -> list[str]:
    """The README's demo table from a finished sweep folder, as markdown lines: identity (the
    base's base.json), the reference, the control (the cascade at 0 steps) and every cascade row,
    with PSNR / SSIM over the entire image (mean over seeds; ± std over seeds where a row's seeds
    disagree by more than 0.5 dB), Δ PSNR entire against the reference and, for the cascade rows,
    against the control of the same seeds (95 % intervals with the seed variance, reports.stats)."""
    import pandas as pd

    from cascade import pretrain
    from reports import stats
    from reports.collect import load_sweep
    from reports.table1 import diff_frame, table1_frame

    sweep = load_sweep(sweep_dir)
    table, diffs = table1_frame(sweep), diff_frame(sweep)
    cells = sweep.cells[sweep.cells["status"] == "done"]
    controls = cells[cells["kind"] == "control"]
    to_control = {(None if pd.isna(s) else int(s)): t for s, t in zip(controls["seed"], controls["trial_id"])}
    wide = stats.per_image_wide(sweep.per_image)
    base = pretrain.ensure_base(demo_config())
    identity = json.loads((base.parent / "base.json").read_text())["quality"]["identity"]

    def interval(row: object) -> str:
        return f"{row['diff']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"

    seeds = sorted({int(s) for s in cells["seed"].dropna()})
    lines = [f"| {len(wide.index.unique('image'))} test images, seeds {seeds[0]}-{seeds[-1]} | "
             "PSNR entire (dB) | SSIM entire | Δ PSNR entire vs reference [95% CI] | "
             "Δ PSNR entire vs control [95% CI] |", "|---|---|---|---|---|",
             f"| identity (input as output) | {identity['psnr_entire']:.2f} | "
             f"{identity['ssim_entire']:.3f} | | |"]
    names = {"reference": "reference (the base)", "control": "control (the cascade at 0 steps)"}
    seen_lambda_0 = False
    for row in table.itertuples(index=False):
        lam0 = row.method == "cascade" and float(row.lambda_) == 0.0
        if lam0 and seen_lambda_0:
            continue  # the λ = 0 cells of both k are one trial
        seen_lambda_0 |= lam0
        name = names.get(row.method) or ("λ = 0 (k has no effect)" if lam0 else f"k={row.k}, λ = {row.lambda_:g}")
        spread = f" ± {row.psnr_entire_std:.2f}" if row.psnr_entire_std > 0.5 else ""
        vs_ref = vs_ctl = ""
        if row.method != "reference":
            hit = diffs[(diffs["method"] == row.method) & (diffs["metric"] == "psnr_entire")]
            if row.method == "cascade":
                hit = hit[np.isclose(hit["lambda_"].astype(float), float(row.lambda_))
                          & (lam0 | (hit["k"].astype(float) == float(row.k)))]
            vs_ref = interval(hit.iloc[0]) if len(hit) else ""
        if row.method == "cascade" and to_control:
            group = cells[(cells["kind"] == "cascade") & ((cells["k"] == row.k) | lam0)
                          & np.isclose(cells["lambda_"].astype(float), float(row.lambda_))]
            trials = [(t, int(s)) for t, s in zip(group["trial_id"], group["seed"])]
            trials = list(dict.fromkeys(trials))  # the λ = 0 trial is planned under both k
            for diff in stats.diff_rows(stats.paired_differences(wide, trials, to_control)):
                if diff["metric"] == "psnr_entire":
                    vs_ctl = interval(diff)
        lines.append(f"| {name} | {row.psnr_entire:.2f}{spread} | {row.ssim_entire:.3f} | {vs_ref} | {vs_ctl} |")
    return lines


def contrast_lines(sweep_dir: Path) -> list[str]:
    """The README paragraph's cell-against-cell effects, with the same seed-inclusive 95 %
    intervals as diff.csv (reports.stats; each seed's trial paired with the other cell's trial
    of that seed): per k, each λ against λ = 1 (PSNR and SSIM entire); per λ, k=1 against k=2."""
    import pandas as pd

    from reports import stats
    from reports.collect import load_sweep

    sweep = load_sweep(sweep_dir)
    cells = sweep.cells[(sweep.cells["status"] == "done") & (sweep.cells["kind"] == "cascade")]
    wide = stats.per_image_wide(sweep.per_image)

    def trials(k: int, lam: float) -> dict[int, str]:
        group = cells[np.isclose(cells["lambda_"].astype(float), lam) & ((cells["k"] == k) | (lam == 0))]
        return {int(s): t for s, t in zip(group["seed"], group["trial_id"]) if pd.notna(s)}

    def contrast(a: dict[int, str], b: dict[int, str]) -> str:
        pairs = [(trial, seed) for seed, trial in a.items()]
        rows = {r["metric"]: r for r in stats.diff_rows(stats.paired_differences(wide, pairs, b))}
        out = []
        for m, unit in (("psnr_entire", " dB"), ("ssim_entire", "")):
            r = rows[m]
            flag = " *" if r["flagged"] else ""
            out.append(f"{m} {r['diff']:+.3f}{unit} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{flag}")
        return "; ".join(out)

    lambdas = sorted({float(v) for v in cells["lambda_"]}, reverse=True)
    lines = ["λ against λ = 1 (same k), 95 % intervals with the seed variance (* excludes 0):"]
    for k in (1, 2):
        for lam in lambdas:
            if lam != 1.0 and trials(k, lam) and trials(k, 1.0):
                lines.append(f"  k={k}, λ {lam:g} − 1: {contrast(trials(k, lam), trials(k, 1.0))}")
    lines.append("k=1 against k=2 (same λ):")
    for lam in lambdas:
        if lam != 0.0 and trials(1, lam) and trials(2, lam):
            lines.append(f"  λ = {lam:g}: {contrast(trials(1, lam), trials(2, lam))}")
    return lines


def check_readme(sweep_dir: Path) -> None:
    """Print `readme_rows` and `contrast_lines`: the README's demo table and the numbers of its
    paragraph, regenerated from `sweep_dir`."""
    print(f"readme: the demo table from {sweep_dir}")
    for line in readme_rows(sweep_dir):
        print(line)
    for line in contrast_lines(sweep_dir):
        print(line)


def check_power(sweep_dir: Path) -> None:
    """Per region and metric: the median MDE over the cells and what the paper's effects need."""
    import pandas as pd

    from reports import stats
    from reports.collect import load_sweep
    from reports.figures import power_lines
    from reports.table1 import diff_frame

    sweep = load_sweep(sweep_dir)
    diffs = diff_frame(sweep)
    if "mde" not in diffs:  # reports.table1 does not carry POWER_COLUMNS yet: recompute them
        rows = []
        refs = sweep.cells[(sweep.cells["kind"] == "reference") & (sweep.cells["status"] == "done")]
        references = {int(s): t for s, t in zip(refs["seed"], refs["trial_id"]) if pd.notna(s)}
        wide = stats.per_image_wide(sweep.per_image)
        cells = sweep.cells[(sweep.cells["kind"] == "cascade") & (sweep.cells["status"] == "done")]
        for (k, lam), group in cells.groupby(["k", "lambda_"]):
            trials = [(t, int(s)) for t, s in zip(group["trial_id"], group["seed"])]
            trials = list(dict.fromkeys(trials))
            for row in stats.diff_rows(stats.paired_differences(wide, trials, references)):
                rows.append({"k": k, "lambda_": lam, "n_seeds": len(trials), **row})
        diffs = pd.DataFrame(rows)
    print("power:")
    cascade = diffs[diffs["method"] == "cascade"] if "method" in diffs else diffs
    for line in power_lines(stats.power_summary(cascade)):  # as the Δ figure: the cascade cells
        print("  " + line)
    for row in diffs.itertuples(index=False):
        if row.metric == "psnr_entire":
            cell = ("control" if getattr(row, "method", "cascade") == "control"
                    else f"k={row.k} lambda_={row.lambda_:g}")
            print(f"  {cell}: diff {row.diff:+.3f} dB "
                  f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}], MDE {row.mde:.3f} dB, "
                  f"sd_image {row.sd_image:.3f}, sd_seed {row.sd_seed:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("noise", "base", "encoder", "budget", "power", "readme"))
    parser.add_argument("--sweep-dir", type=Path, help="a finished demo sweep (budget, power)")
    parser.add_argument("--size", type=int, default=64, help="image side of the noise check")
    args = parser.parse_args(argv)
    if args.check in ("power", "readme") and args.sweep_dir is None:
        parser.error(f"{args.check} needs --sweep-dir")
    if args.check == "budget":  # exit status 1 when the idempotence gap is out of its bounds
        sys.exit(0 if check_budget(args.sweep_dir) else 1)
    {"noise": lambda: check_noise(size=args.size), "base": check_base, "encoder": check_encoder,
     "power": lambda: check_power(args.sweep_dir),
     "readme": lambda: check_readme(args.sweep_dir)}[args.check]()


if __name__ == "__main__":
    main()
