"""reports.table1: Table 1 CSV/LaTeX, differences, paper side by side, build_reports and the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_collect import fidelity_lpips, make_results_tree, result_dir

from cascade.errors import UserError
from reports.collect import METRICS, load_sweep
from reports.table1 import (
    brief_reason,
    build_reports,
    caption_text,
    diff_frame,
    main,
    paper_vs_ours,
    read_paper,
    table1_frame,
    table1_latex,
    write_csv,
)


def _hand_table(rows: list[tuple], lpips: list[float] | None = None,
                lpips_reason: str = "") -> pd.DataFrame:
    """A table1_frame by hand: (method, k, lambda_, psnr_entire, ssim_entire[, n_seeds, std]);
    lpips_entire per row from `lpips` (default: none, with `lpips_reason`)."""
    out = []
    for i, (method, k, lam, psnr, ssim, *rest) in enumerate(rows):
        n_seeds, std = rest if rest else (1, np.nan)
        row = {"method": method, "k": k, "lambda_": lam, "n_seeds": n_seeds, "n_planned": max(n_seeds, 1),
               "status": "done" if psnr is not None else "failed", "shared": lam == 0.0,
               "error": None if psnr is not None else "CUDA out of memory", "trial_ids": "t"}
        for m in METRICS:
            base = psnr if m.startswith("psnr") else ssim
            row[m] = np.nan if base is None else base
            row[m + "_std"] = std
        row["lpips_entire"] = np.nan if lpips is None or lpips[i] is None else lpips[i]
        row["lpips_entire_std"], row["lpips_reason"] = std, lpips_reason
        out.append(row)
    frame = pd.DataFrame(out)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def _body(latex: str) -> list[str]:
    lines = latex.splitlines()
    start = lines.index("\\midrule", lines.index("\\toprule")) + 1
    return [line for line in lines[start:lines.index("\\bottomrule")] if line != "\\midrule"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return load_sweep(make_results_tree(tmp_path_factory.mktemp("t1"), seeds=(0, 1), with_images=False))


def test_row_order_reference_then_k_then_lambda_in_sweep_order(sweep):
    table = table1_frame(sweep)
    keys = [(m, None if pd.isna(k) else int(k), None if pd.isna(lam) else lam)
            for m, k, lam in zip(table["method"], table["k"], table["lambda_"])]
    assert keys == [("reference", None, None), ("cascade", 1, 1.0), ("cascade", 1, 0.6),
                    ("cascade", 1, 0.0), ("cascade", 2, 1.0), ("cascade", 2, 0.6), ("cascade", 2, 0.0)]


def test_mean_std_over_seeds_and_partial_rows(sweep):
    table = table1_frame(sweep).set_index(["method", "k", "lambda_"])
    cells = sweep.cells
    k2 = cells[(cells["k"] == 2) & (cells["lambda_"] == 1.0)]["psnr_glare"]
    assert table.loc[("cascade", 2, 1.0), "psnr_glare"] == pytest.approx(k2.mean())
    assert table.loc[("cascade", 2, 1.0), "psnr_glare_std"] == pytest.approx(k2.std(ddof=1))
    partial = table.loc[("cascade", 1, 0.6)]  # seed 0 failed, seed 1 finished
    assert (partial["status"], partial["n_seeds"], partial["n_planned"]) == ("partial", 1, 2)
    assert partial["error"] == "non-finite loss at step 3"
    assert table.loc[("cascade", 1, 0.0), "shared"] and table.loc[("cascade", 2, 0.0), "shared"]


def test_demo_is_flagged_in_csv_and_caption(sweep):
    table = table1_frame(sweep)
    assert table["demo"].all()
    assert "random-weight encoder" in table.loc[1, "demo_reasons"]
    caption = caption_text(table, sweep, "Table 1.")
    assert caption.startswith("\\textbf{DEMO RESULTS, NOT COMPARABLE TO THE PAPER (random-weight encoder;")
    assert "procedural base" in caption and "\\texttt{masked}" in caption and "Seeds: 0, 1" in caption


def test_real_run_is_not_flagged(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, real=True, failed=(), with_images=False))
    table = table1_frame(sweep)
    assert not table["demo"].any() and (table["demo_reasons"] == "").all()
    caption = caption_text(table, sweep, "Table 1.")
    assert "DEMO" not in caption
    assert "/ckpt/net\\_g\\_last.pth" in caption and "resnet18 (pretrained)" in caption


def test_csv_round_trip(sweep, tmp_path):
    table = table1_frame(sweep)
    back = pd.read_csv(write_csv(table, tmp_path / "table1.csv"))
    assert list(back.columns) == list(table.columns)
    assert list(back.columns[:9]) == ["method", "k", "lambda_", *METRICS]
    np.testing.assert_allclose(back[list(METRICS)].to_numpy(), table[list(METRICS)].to_numpy(float))
    assert back["k"].isna().tolist() == table["k"].isna().tolist()
    assert (back["n_seeds"] == table["n_seeds"]).all()


def test_latex_rounding_bold_and_missing():
    table = _hand_table([
        ("reference", None, None, 23.7412, 0.86921),
        ("cascade", 1, 1.0, 23.744, 0.87101),  # ties the reference at 2 decimals: both bold
        ("cascade", 1, 0.6, None, None),  # failed
        ("cascade", 2, 1.0, 23.1, 0.87104),  # best SSIM (0.8710 ties row 2 at 4 decimals)
    ], lpips=[0.21234, 0.2101, None, 0.23])
    latex = table1_latex(table, caption="Cap.", label="tab:t", sweep_dir="results/x")
    body = _body(latex)
    assert len(body) == 4 and all(line.count("&") == 9 for line in body)
    assert "0.8692 &" in body[0] and "23.741" not in latex and "0.87104" not in latex
    assert body[0].count("\\textbf{23.74}") == 3 and body[1].count("\\textbf{23.74}") == 3
    assert "\\textbf{0.8710}" in body[1] and "\\textbf{0.8710}" in body[3]
    # LPIPS: lower is better, 4 decimals; the failed row's LPIPS cell is "---" like the others.
    assert body[0].endswith("& 0.2123 \\\\") and body[1].endswith("& \\textbf{0.2101} \\\\")
    assert latex.count("\\textbf{") == 13  # 3 PSNR x 2 tied rows + 3 SSIM x 2 tied rows + LPIPS
    assert body[2].count("---$^{a}$") == 7 and "0" not in body[2].split("&", 3)[3]
    assert "$^{a}$\\,Trial failed: CUDA out of memory (see results/x/trials/t/error.json)." in latex


def test_latex_structure_and_mean_std():
    table = _hand_table([("reference", None, None, 23.74, 0.8692),
                         ("cascade", 2, 0.6, 23.18, 0.8706, 3, 0.051),
                         ("cascade", 2, 0.0, 23.71, 0.8679)])
    latex = table1_latex(table, caption="Demo \\& more.", label="tab:table1-demo")
    for needle in ("\\begin{table}", "\\centering", "\\toprule", "\\cmidrule(lr){4-6}",
                   "\\cmidrule(lr){10-10}", "\\midrule",
                   "\\bottomrule", "\\end{tabular}", "\\end{table}", "\\caption{Demo \\& more.}",
                   "\\label{tab:table1-demo}", "\\multicolumn{3}{c}{PSNR (dB)}"):
        assert needle in latex, needle
    assert latex.index("\\caption") < latex.index("\\begin{tabular}")
    body = _body(latex)
    assert "23.18\\,{\\scriptsize$\\pm$0.05}" in body[1] and "0.8706\\,{\\scriptsize$\\pm$0.0510}" in body[1]
    assert "0.0$^{a}$" in body[2] and "has no $L_\\mathrm{REG}$ term" in latex
    assert latex.count("\\midrule") == 2  # header rule + rule between reference and ours


def _pdflatex(tmp_path: Path, name: str, preamble: str, body: str) -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.tex").write_text(
        f"\\documentclass{{article}}\n{preamble}\n\\begin{{document}}\n{body}\\end{{document}}\n")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


# .ci/run installs a LaTeX engine and sets FLARESWEEP_REQUIRE_LATEX=1: there this test fails
# instead of skipping when pdflatex is missing.
@pytest.mark.skipif(shutil.which("pdflatex") is None and os.environ.get("FLARESWEEP_REQUIRE_LATEX") != "1",
                    reason="no LaTeX engine installed")
def test_latex_compiles_with_exactly_the_packages_its_header_names(tmp_path, monkeypatch):
    assert shutil.which("pdflatex"), "FLARESWEEP_REQUIRE_LATEX=1 but no pdflatex on PATH"
    # Fidelity captions (d(p, n) with \lVert), a failed seed (a one-seed row and footnotes), 2 seeds.
    sweep_dir = make_results_tree(tmp_path / "tree", seeds=(0, 1), with_images=False, fidelity=True)
    monkeypatch.setattr("reports.figures.write_figures", lambda *a, **k: [])
    build_reports(sweep_dir, paper=False)
    for name in ("table1", "diff"):
        latex = (sweep_dir / f"{name}.tex").read_text()
        header = re.match(r"% Generated by .*\n% Needs ((?:\\usepackage\{\w+\}(?: and )?)+)\.\n", latex)
        assert header, latex[:300]
        packages = re.findall(r"\\usepackage\{(\w+)\}", header.group(1))
        assert packages == ["booktabs", "amsmath"]
        run = _pdflatex(tmp_path, name, "".join(f"\\usepackage{{{p}}}" for p in packages), latex)
        assert run.returncode == 0, run.stdout[-2000:]
        assert "Missing character" not in (tmp_path / f"{name}.log").read_text(errors="replace")
    # Negative control: the header's packages are all needed (the captions use amsmath's \lVert).
    run = _pdflatex(tmp_path, "booktabs_only", "\\usepackage{booktabs}", (sweep_dir / "table1.tex").read_text())
    assert run.returncode != 0 and "Undefined control sequence" in run.stdout


def test_without_lpips_weights_the_column_says_why(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, failed=(), with_images=False, fidelity=True,
                                         lpips_weights=False))
    table = table1_frame(sweep)
    assert table["lpips_entire"].isna().all()
    assert (table["lpips_reason"] == "no AlexNet trunk weights offline (alexnet.pth)").all()
    latex = table1_latex(table, caption="c")
    body = _body(latex)
    assert all(line.split("&")[-1].strip().startswith("---$^{") for line in body)
    assert "LPIPS not computed: no AlexNet trunk weights offline (alexnet.pth)." in latex
    assert latex.count("LPIPS not computed") == 1  # one footnote for every row
    back = pd.read_csv(write_csv(table, tmp_path / "table1.csv"))
    assert back["lpips_entire"].isna().all()  # an empty field, never 0


def test_lpips_footnote_keeps_the_first_sentence_without_the_machines_path():
    from cascade.lpips_score import missing_weights_message

    brief = brief_reason(missing_weights_message())
    assert brief.startswith("LPIPS needs the AlexNet trunk weights") and "/" not in brief.split(")")[-1]
    assert "not found on the machine that evaluated" in brief



def test_fidelity_columns_and_caption(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, seeds=(0, 1), failed=(), with_images=False,
                                         fidelity=True))
    table = table1_frame(sweep).set_index(["method", "k", "lambda_"])
    ref = table.iloc[0]
    assert ref["lpips_entire"] == pytest.approx(np.mean([fidelity_lpips(None, s) for s in (0, 1)]))
    assert ref["lpips_entire_std"] == pytest.approx(np.std([0.25, 0.252], ddof=1))
    assert (ref["reduction"], ref["base_kind"], ref["eval_mode"], ref["lpips"]) == (
        "", "flare7kpp", "native", "flare7k")
    row = table.loc[("cascade", 2, 0.6)]
    assert row["lpips_entire"] == pytest.approx(np.mean([fidelity_lpips((2, 0.6), s) for s in (0, 1)]))
    assert (row["reduction"], row["encoder_features"], row["random_erasing"], row["margin"]) == (
        "mean", "cls", "0.5", "0.1")
    assert row["d_pn_p50"] == pytest.approx(0.45) and row["d_pn_hinge_active"] == pytest.approx(0.5)
    assert np.isnan(table.loc[("cascade", 1, 1.0), "d_pn_p50"])  # lambda_ = 1: no triplet term
    frame = table1_frame(sweep)
    back = pd.read_csv(write_csv(frame, tmp_path / "table1.csv"))
    np.testing.assert_allclose(back["lpips_entire"], frame["lpips_entire"])
    assert back.loc[0, "lpips_fingerprint"] == "0123456789abcdef"
    values = ["method", "k", "lambda_", *METRICS, "lpips_entire"]
    assert list(frame.columns[:10]) == values  # the paper's columns first, then LPIPS
    caption = caption_text(frame, sweep, "Table 1.")
    for needle in ("norms reduced by \\texttt{mean} per sample", "encoder features \\texttt{cls}",
                   "random erasing $p = 0.5$ (of the input only)", "margin $\\alpha = 0.1$",
                   "has median 0.45 over training", "hinge active for 50\\,\\% of samples",
                   "base kind \\texttt{flare7kpp} (channels 0:3 as predicted",
                   "mode \\texttt{native}", "\\texttt{flare7k} convention ([0, 1] inputs without"):
        assert needle in caption, needle
    latex = table1_latex(frame, caption=caption)
    assert "\\textbf{0.2" in latex and "LPIPS not computed" not in latex
    assert "cannot vanish" not in caption  # alpha = 0.1 < the median 0.45
    frame["margin"] = frame["margin"].replace("0.1", "1.0")
    assert "below $\\alpha$: the triplet term cannot vanish" in caption_text(frame, sweep, "T.")


def test_lpips_texts_name_the_configs_conventions():
    from cascade.config import LPIPS_CONVENTIONS
    from reports.table1 import LPIPS_TEXT

    assert tuple(LPIPS_TEXT) == LPIPS_CONVENTIONS


def test_diff_ci_finds_the_built_in_effects(sweep):
    diffs = diff_frame(sweep, n_resamples=500).set_index(["k", "lambda_", "metric"])
    big = diffs.loc[(2, 1.0, "psnr_entire")]  # every image +0.30 dB, noise sd 0.05
    assert big["ci_low"] < 0.30 < big["ci_high"] and big["excludes_zero"]
    assert big["n_images"] == 12 and big["n_seeds"] == 2
    ssim = diffs.loc[(2, 0.6, "ssim_glare")]  # -0.20 x 0.01 per image
    assert ssim["diff"] == pytest.approx(-0.002, abs=5e-4) and ssim["excludes_zero"]
    zero = diffs.loc[(1, 0.0, "psnr_entire")]  # λ=0: no effect, noise only
    assert zero["ci_low"] < 0 < zero["ci_high"] and not zero["excludes_zero"]
    # diff.csv carries what the sweep could detect: noise sd 0.05 per image, 12 images, 2 seeds
    assert big["sd_image"] < 0.1 and 0 < big["mde"] < 0.30 and big["effect_large"] == 0.3
    assert big["n_images_large"] <= 12  # the built-in 0.3 dB needs no more images than it has


def test_paper_alignment_renames_lambda(sweep):
    paper = read_paper()
    assert "lambda_" in paper.columns and "lambda" not in paper.columns and len(paper) == 13
    out = paper_vs_ours(table1_frame(sweep), paper).set_index(["method", "k", "lambda_"])
    assert out.loc[("cascade", 2, 0.6), "psnr_entire_paper"] == 23.18
    row = out.loc[("cascade", 2, 0.6)]
    assert row["psnr_entire_diff"] == pytest.approx(row["psnr_entire_ours"] - 23.18)
    ref = out[out.index.get_level_values("method") == "reference"].iloc[0]
    assert ref["ssim_glare_paper"] == 0.9269 and np.isfinite(ref["ssim_glare_ours"])
    only_paper = out.loc[("cascade", 1, 0.8)]  # not in our sweep: kept, ours empty
    assert only_paper["psnr_entire_paper"] == 23.76 and np.isnan(only_paper["psnr_entire_ours"])
    assert out.index.get_level_values("method")[0] == "reference"


def test_build_reports_writes_everything_atomically(tmp_path, monkeypatch):
    sweep_dir = make_results_tree(tmp_path, with_images=False)
    monkeypatch.setattr("reports.figures.write_figures", lambda *a, **k: [])  # figures: own tests
    written = build_reports(sweep_dir)
    names = sorted(p.name for p in written)
    assert names == ["diff.csv", "diff.tex", "paper_vs_ours.csv", "table1.csv", "table1.tex"]
    assert {"mde", "n_images_small", "n_seeds_large"} <= set(pd.read_csv(sweep_dir / "diff.csv").columns)
    assert all(p.stat().st_size > 0 for p in written)
    assert not list(sweep_dir.glob(".*tmp"))  # no temporary file left behind
    assert "paper_vs_ours.csv" not in [p.name for p in build_reports(sweep_dir, paper=False)]
    delta_tex = (sweep_dir / "diff.tex").read_text()
    # One seed (the tree's default): the +0.3 dB cell's interval is over images alone and unmarked.
    big = r"\$\+0\.3\d\$\\,\{\\scriptsize\$\[\+0\.\d\d, \+0\.\d\d\]\$\}"
    assert re.search(big + r"(?!\$\^\{\\ast)", delta_tex)
    assert "\\ast" not in delta_tex[delta_tex.index("\\midrule"):]  # no cell marked
    assert "Seed variance not measured (1 seed)" in delta_tex and "not marked" in delta_tex
    assert "seed variance not measured (1 seed)" in (sweep_dir / "table1.tex").read_text()
    # Asked by name, the same cell is marked on image noise alone, and the caption says so.
    build_reports(sweep_dir, paper=False, flag_on_image_noise=True)
    delta_tex = (sweep_dir / "diff.tex").read_text()
    assert re.search(big + r"\$\^\{\\ast\}\$", delta_tex) and "marked on image noise alone" in delta_tex
    assert pd.read_csv(sweep_dir / "diff.csv")["flagged"].any()


def test_two_seeds_mark_cells_and_holm_marks_a_subset(tmp_path, monkeypatch):
    sweep_dir = make_results_tree(tmp_path, seeds=(0, 1), n_images=24, failed=(), with_images=False)
    monkeypatch.setattr("reports.figures.write_figures", lambda *a, **k: [])
    build_reports(sweep_dir, paper=False)
    diffs = pd.read_csv(sweep_dir / "diff.csv")
    assert diffs["seed_variance_measured"].all() and diffs["flagged"].any()
    assert (diffs["flagged"] == diffs["excludes_zero"]).all()
    assert not (diffs["flagged_holm"] & ~diffs["flagged"]).any()
    delta_tex = (sweep_dir / "diff.tex").read_text()
    body = delta_tex[delta_tex.index("\\midrule"):]  # the caption, with its legend, comes first
    assert body.count("$^{\\ast}$") == int(diffs["flagged"].sum())
    assert body.count("$^{\\dagger}$") == int(diffs["flagged_holm"].sum())
    # The family: 5 distinct cells (the λ = 0 trial counts once) x 6 metrics.
    assert (diffs["family_size"] == 30).all() and "the 30 distinct comparisons" in delta_tex


def test_nothing_to_report_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        build_reports(Path("results/demo"))
    assert str(err.value) == "results/demo: no sweep results (run `make sweep` first)"
    with pytest.raises(SystemExit) as exit_:
        main(["--sweep-dir", "results/demo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: results/demo: no sweep results (run `make sweep` first)\n"


def test_search_trials_follow_the_grid_and_stopped_cells_are_footnoted(tmp_path):
    import json

    sweep_dir = make_results_tree(tmp_path, failed=(), with_images=False)
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    for tid, lam in (("opt-a", 0.2), ("opt-b", 0.8)):  # sampled in this order
        plan["cells"].append({**plan["cells"][4], "trial_id": tid, "lambda_": lam,
                              "sampled": {"lambda_": lam}})
    (sweep_dir / "sweep.json").write_text(json.dumps(plan))
    (result_dir(sweep_dir, "k2-l0.6-s0") / "metrics.json").unlink()
    (sweep_dir / "trials" / "k2-l0.6-s0" / "stopped.json").write_text("{}")
    sweep = load_sweep(sweep_dir)
    table = table1_frame(sweep)
    assert table.loc[table["k"] == 2, "lambda_"].tolist() == [1.0, 0.6, 0.0, 0.8, 0.2]
    latex = table1_latex(table, caption="c")
    assert "Stopped early by the scheduler" in latex and "No result yet" in latex


def test_reports_import_neither_torch_nor_ray():
    import sys

    code = ("import sys, reports.table1, reports.figures; "
            "assert not {'torch', 'ray'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_results_readme_documents_every_diff_csv_column(tmp_path, monkeypatch):
    sweep_dir = make_results_tree(tmp_path, seeds=(0, 1), with_images=False)
    monkeypatch.setattr("reports.figures.write_figures", lambda *a, **k: [])
    build_reports(sweep_dir, paper=False)
    columns = list(pd.read_csv(sweep_dir / "diff.csv").columns)
    readme = (Path(__file__).resolve().parents[1] / "results" / "README.md").read_text()
    section = readme.split("## diff.csv", 1)[1]
    documented = [name.strip() for line in section.splitlines() if line.startswith("| ")
                  for name in line.split("|")[1].split(",")]
    assert sorted(set(documented) - {"column"}) == sorted(columns)
