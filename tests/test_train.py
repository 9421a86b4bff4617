"""The trial: training reduces the loss, negative frozen, exact resume, reference path, NaN error,
DDP with 2 CPU ranks, and the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_evaluate import use_random_lpips

from cascade import distributed
from cascade import train as T
from cascade.config import TrialConfig
from cascade.data import batches as B
from cascade.data.images import to_tensor, to_uint8
from cascade.data.testset import PairedTestSet, ensure_test_data
from cascade.metrics import evaluate_arrays, summarize
from cascade.model import CascadedFlareRemover
from cascade.pretrain import ensure_base
from cascade.uformer import load_checkpoint

TINY = dict(embed_dim=8, depth=1, base_steps=2, crop=32, batch_size=2, n_test=2, test_size=32,
            encoder="small_cpu", encoder_pretrained=False, eval_workers=0, n_samples=1,
            log_every=2, checkpoint_every=2, steps=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache: str, **changes) -> TrialConfig:
    return TrialConfig.from_dict({**TINY, "base_cache": cache, **changes})


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_training_lowers_the_loss_and_leaves_the_negative_untouched(cache, monkeypatch, tmp_path):
    # lambda_=1, delta=0: L_REG only (no encoder), Adam so a few steps visibly move the anchor.
    cfg = tiny(cache, lambda_=1.0, delta=0.0, optimizer="adam", lr=3e-3, steps=12, log_every=4)
    built: list[CascadedFlareRemover] = []
    original = CascadedFlareRemover.from_checkpoint.__func__

    def spy(cls, path, **kw):
        model = original(cls, path, **kw)
        built.append(model)
        return model

    monkeypatch.setattr(CascadedFlareRemover, "from_checkpoint", classmethod(spy))
    reports: list[dict] = []
    result = T.train(cfg, report=lambda m, c: reports.append(m), output_dir=tmp_path)

    losses = [r["loss"] for r in reports if "eta_s" in r]
    assert [r["step"] for r in reports if "eta_s" in r] == [4, 8, 12]
    assert losses[-1] < losses[0]
    assert reports[-1] == result and result["steps"] == 12 and result["images_per_s"] > 0

    base = load_checkpoint(ensure_base(cfg)).state_dict()
    trained = built[0]  # the first cascade built is the one that was trained
    for k, v in trained.negative.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert all(not p.requires_grad for p in trained.negative.parameters())
    moved = [k for k, v in trained.anchor.state_dict().items() if not torch.equal(v, base[k])]
    assert moved, "the anchor did not change"

    for name in ("config.json", "metrics.json", "per_image.csv", "checkpoints/last.pt"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_data_dir"] == str(ensure_test_data(cfg)) and saved["kind"] == "cascade"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


@pytest.mark.parametrize(("reduction", "features"), [("sum", "tokens"), ("mean", "cls")])
def test_loss_conventions_are_used_and_recorded(cache, monkeypatch, tmp_path, reduction, features):
    from cascade import losses

    built = []
    real = losses.CascadeLoss.__init__

    def spy(self, encoder, *args, **kwargs):
        real(self, encoder, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(losses.CascadeLoss, "__init__", spy)
    cfg = tiny(cache, steps=2, reduction=reduction, encoder_features=features, random_erasing=0.5)
    result = T.train(cfg, output_dir=tmp_path)
    loss = built[0]
    assert loss.reduction == reduction and loss.encoder.features == features
    # small_cpu: 512 pooled values (cls) or its 512 x 4 x 4 activation map (tokens, 32 px -> 128 px)
    assert loss.encoder.embed_dim == (512 * 16 if features == "tokens" else 512)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for record in (result, saved):
        assert (record["reduction"], record["encoder_features"], record["random_erasing"]) == (
            reduction, features, 0.5)
        assert (record["data_loader"], record["base_kind"], record["eval_mode"]) == (
            "procedural", "flare7kpp", "native")
        assert record["lpips"] == "flare7k" and "lpips_entire" in record
        d = record["d_pn"]
        assert d["count"] == 4 and d["min"] <= d["p50"] <= d["max"] and 0 <= d["hinge_active"] <= 1
    assert saved["d_pn"] == result["d_pn"]
    # `sum` adds over the embedding's elements: d is D (here 8192) times the mean's order.
    if reduction == "sum":
        assert result["d_pn"]["mean"] > 50 * TrialConfig().margin


def test_lambda_one_records_no_distances(cache, tmp_path):
    result = T.train(tiny(cache, steps=2, lambda_=1.0, delta=0.0))
    assert result["d_pn"]["count"] == 0 and result["d_pn"]["p50"] is None


def test_random_erasing_reaches_the_procedural_pairs(cache):
    plain = B.build_pairs(tiny(cache)).batch([0, 1, 2, 3])
    erased = B.build_pairs(tiny(cache, random_erasing=1.0, random_erasing_on="input")).batch([0, 1, 2, 3])
    assert B.data_loader(B.build_pairs(tiny(cache))) == "procedural"
    assert not torch.equal(plain[0], erased[0])  # the input has its box
    assert torch.equal(plain[1], erased[1]) and torch.equal(plain[2], erased[2])  # gt, flare not
    # The paper's reading (the default target): the box is in the ground truth too.
    background = B.build_pairs(tiny(cache, random_erasing=1.0)).batch([0, 1, 2, 3])
    assert not torch.equal(plain[1], background[1]) and torch.equal(plain[2], background[2])


def test_procedural_fine_tuning_pairs_are_crops_of_test_size_frames(cache):
    # Training crops are windows of frames at the test resolution, as the base's: flares have the
    # test images' scale in pixels (lambda_optuna.yaml: 64 px crops, 128 px test images).
    pairs = B.build_pairs(tiny(cache, crop=32, test_size=64))
    assert (pairs.size, pairs.frame) == (32, 64)
    assert B.build_pairs(tiny(cache, crop=32, test_size=32)).frame == 32


def test_a_control_trial_is_the_untrained_cascade(cache, tmp_path):
    # kind "control": the cascade at 0 steps, evaluated as the cascade is, never trained.
    control = T.train(tiny(cache, kind="control"), output_dir=tmp_path / "ctl")
    zero = T.train(tiny(cache, steps=0, lambda_=1.0, delta=0.0), output_dir=tmp_path / "zero")
    reference = T.train(tiny(cache, kind="reference"), output_dir=tmp_path / "ref")
    assert control["kind"] == "control" and control["steps"] == 0 and control["k"] is None
    for m in ("psnr_entire", "ssim_entire", "psnr_streak"):
        assert control[m] == zero[m]  # the same network, the same evaluation
    assert control["psnr_entire"] != reference["psnr_entire"]  # the base applied twice is not the base


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 6-channel Uformer file standing in for a released checkpoint."""
    from cascade.uformer import Uformer, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "net.pth"
    save_checkpoint(Uformer(img_size=32, embed_dim=8, depths=(1,) * 9), path)
    return str(path)


def test_base_kind_picks_the_evaluation_path_of_a_trial(cache, tiny_checkpoint, monkeypatch, tmp_path):
    """flare7k (v1): the evaluation re-blends the input's light sources (test.py:97, 0.97);
    flare7kpp: it does not. The procedural test images have saturated lights."""
    from cascade import model as model_module

    blends: list[float] = []
    real = model_module.blend_light_source

    def spy(inputs, deflared, threshold=model_module.DEFAULT_LIGHT_THRESHOLD):
        blends.append(threshold)
        return real(inputs, deflared, threshold)

    monkeypatch.setattr(model_module, "blend_light_source", spy)
    results = {}
    for kind in ("flare7k", "flare7kpp"):
        blends.clear()
        cfg = tiny(cache, kind="reference", checkpoint=tiny_checkpoint, base_kind=kind, n_samples=2)
        results[kind] = T.train(cfg, output_dir=tmp_path / kind)
        assert blends == ([0.97] * 2 if kind == "flare7k" else [])
        assert results[kind]["base_kind"] == kind
    assert results["flare7k"]["light_threshold"] == 0.97 and results["flare7kpp"]["light_threshold"] is None
    # The samples: v1 = the ++ output with the input's light blended back, exactly.
    from cascade.data.images import read_rgb, to_tensor, to_uint8

    item = PairedTestSet(ensure_test_data(tiny(cache)))[0]
    plain = read_rgb(tmp_path / "flare7kpp" / "samples" / f"{item.stem}.png")
    v1 = read_rgb(tmp_path / "flare7k" / "samples" / f"{item.stem}.png")
    x = to_tensor(item.input)[None]
    base = load_checkpoint(tiny_checkpoint).eval()
    with torch.no_grad():
        raw = base(x)[:, :3]
    assert (plain == to_uint8(raw[0])).all()
    assert (v1 == to_uint8(real(x, raw)[0])).all() and not (v1 == plain).all()


def test_a_cascade_trial_with_a_v1_checkpoint_blends_the_anchor_output(cache, tiny_checkpoint, tmp_path):
    cfg = tiny(cache, checkpoint=tiny_checkpoint, base_kind="flare7k", steps=2, lambda_=1.0, delta=0.0)
    result = T.train(cfg, output_dir=tmp_path)
    assert (result["base_kind"], result["light_threshold"], result["kind"]) == ("flare7k", 0.97, "cascade")


def test_lpips_appears_in_per_image_and_metrics_when_weights_exist(cache, monkeypatch, tmp_path):
    build = use_random_lpips(monkeypatch)  # LPIPS "available", seeded random AlexNet weights
    result = T.train(tiny(cache, kind="reference", n_samples=2), output_dir=tmp_path)
    rows = pd.read_csv(tmp_path / "per_image.csv", dtype={"image": str})
    lp = rows[rows["metric"] == "lpips"]
    assert len(lp) == 2 and set(lp["region"]) == {"entire"}
    assert result["lpips_entire"] == pytest.approx(lp["value"].mean())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["lpips_entire"] == result["lpips_entire"] and saved["lpips_weights_source"] == "random"
    assert saved["lpips_fingerprint"] == build().fingerprint and saved["lpips_reason"] is None
    # The score of the saved sample against its gt, recomputed directly with the same weights.
    from cascade.data.images import read_rgb

    item = PairedTestSet(ensure_test_data(tiny(cache)))[0]
    pred = read_rgb(tmp_path / "samples" / f"{item.stem}.png")
    direct = build()(pred, item.gt, "flare7k")
    assert lp.loc[lp["image"] == item.stem, "value"].item() == pytest.approx(direct, abs=1e-6)


def test_bad_base_kind_or_lpips_weights_fail_before_anything_is_written(cache, tmp_path):
    from cascade.uformer import Uformer, save_checkpoint

    three = tmp_path / "three.pth"
    save_checkpoint(Uformer(img_size=32, embed_dim=8, depths=(1,) * 9, output_ch=3), three)
    out = tmp_path / "out"
    with pytest.raises(T.UserError, match=r"three.pth: base_kind=flare7kpp, but this Uformer has 3"):
        T.train(tiny(cache, kind="reference", checkpoint=str(three), base_kind="flare7kpp"),
                output_dir=out)
    with pytest.raises(T.UserError, match=r"^lpips_weights='/nowhere/alexnet.pth': "):
        T.train(tiny(cache, kind="reference", lpips_weights="/nowhere/alexnet.pth"), output_dir=out)
    assert not out.exists()


class _Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_is_bit_identical(cache, tmp_path):
    # lambda_=0.6: the encoder path too; momentum + cosine: optimizer and schedule state matter
    cfg = tiny(cache, steps=6, log_every=3, checkpoint_every=3, momentum=0.9, schedule="cosine")
    straight = T.train(cfg, checkpoint_dir=tmp_path / "a", output_dir=tmp_path / "out_a")

    def stop_at_3(metrics, checkpoint_dir):
        if metrics.get("step") == 3:
            assert checkpoint_dir is not None  # checkpoint written before the report
            raise _Interrupt

    with pytest.raises(_Interrupt):
        T.train(cfg, report=stop_at_3, checkpoint_dir=tmp_path / "b")
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    torch.rand(10)  # a resumed process starts from another RNG state
    resumed = T.train(cfg, checkpoint_dir=tmp_path / "b", output_dir=tmp_path / "out_b")

    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("psnr_entire", "psnr_glare", "ssim_streak", "final_loss"):
        assert straight[key] == resumed[key], key
    # d(p, n) of all 6 steps x 2 samples: 3 steps from the checkpoint, 3 from the resumed run.
    assert straight["d_pn"]["count"] == resumed["d_pn"]["count"] == 12
    assert resumed["d_pn"] == straight["d_pn"]
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["extra"]["d_pn"]
    assert len(saved["d_pn"]) == len(saved["hinge_active"]) == 12


def test_eval_every_reports_test_metrics_while_training_without_changing_the_result(cache, tmp_path):
    # lambda_=0.6 with the encoder; log every 4, evaluate every 2 (steps 2 and 4 of 6; 6 is the end)
    cfg = tiny(cache, steps=6, log_every=4, checkpoint_every=3, momentum=0.9)
    plain = T.train(cfg, checkpoint_dir=tmp_path / "a")
    reports: list[dict] = []
    evaluated = T.train(cfg.replace(eval_every=2), report=lambda m, c: reports.append(m),
                        checkpoint_dir=tmp_path / "b")

    during = [r for r in reports[:-1] if "psnr_entire" in r]
    assert [r["step"] for r in during] == [2, 4]
    # step 4: one report, log and metrics merged; step 6 (the last): the log, then the result
    assert [r["step"] for r in reports[:-1]] == [2, 4, 6] and "psnr_entire" not in reports[-2]
    assert "eta_s" in during[1] and "eta_s" not in during[0]
    assert all(set(r) >= {"psnr_streak", "ssim_glare", "n_images"} for r in during)
    assert reports[-1] is evaluated
    # Evaluating in between (eval mode, no grad) leaves training, and so the result, unchanged.
    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("psnr_entire", "ssim_entire", "final_loss"):
        assert plain[key] == evaluated[key], key
    # The step-2 PSNR is that of the model after 2 steps: not the final one in general, but close.
    assert abs(during[0]["psnr_entire"] - evaluated["psnr_entire"]) < 3


def test_resume_refuses_a_changed_config(cache, tmp_path):
    T.train(tiny(cache, steps=2, lambda_=1.0, delta=0.0), checkpoint_dir=tmp_path)
    with pytest.raises(T.UserError, match="lambda_"):
        T.train(tiny(cache, steps=2, lambda_=0.8, delta=0.0), checkpoint_dir=tmp_path)


def test_reference_trial_equals_evaluating_the_base_directly(cache, tmp_path):
    cfg = tiny(cache, kind="reference", protocol="flare7k")
    result = T.train(cfg, output_dir=tmp_path)

    base = load_checkpoint(ensure_base(cfg)).eval()
    items = []
    for item in (ts := PairedTestSet(ensure_test_data(cfg))):
        with torch.no_grad():
            pred = to_uint8(base(to_tensor(item.input)[None])[0, :3])
        items.append((item.stem, pred, item.gt, item.mask))
    direct = evaluate_arrays(items, protocol="flare7k", workers=0)
    written = pd.read_csv(tmp_path / "per_image.csv", dtype={"image": str})
    written = written[written["metric"] != "lpips"]  # rows only where AlexNet weights are cached
    pd.testing.assert_frame_equal(written, direct, check_dtype=False, check_exact=False, rtol=1e-12)
    expected = summarize(direct)
    for key in ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "score", "n_images"):
        assert result[key] == expected[key], key
    assert result["n_images"] == len(ts) and result["steps"] == 0 and result["kind"] == "reference"
    # The procedural base is Flare7K++-style: no light-source re-blend; no loss, so no d(p, n).
    assert (result["base_kind"], result["eval_mode"], result["light_threshold"]) == ("flare7kpp", "native", None)
    assert result["d_pn"] is None and result["reduction"] is None and result["random_erasing"] is None
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing checkpointed


def test_non_finite_loss_names_the_step_and_terms_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    cfg = tiny(cache, fail_at_step=3, steps=6, log_every=6, checkpoint_every=2,
               lambda_=1.0, delta=0.0)
    with pytest.raises(T.NonFiniteLossError, match=r"step 3: loss=nan, reg=") as info:
        T.train(cfg, checkpoint_dir=tmp_path)
    assert info.value.step == 3 and set(info.value.terms) == set(T.LOSS_TERMS)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 2  # the check ran before step 4's checkpoint could save NaN weights
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_two_ddp_workers_give_the_same_results_structure(cache, tmp_path):
    single = T.train(tiny(cache, lambda_=1.0, delta=0.0), output_dir=tmp_path / "one")
    reports: list[dict] = []
    double = T.train(tiny(cache, lambda_=1.0, delta=0.0, backend="ddp", workers=2),
                     report=lambda m, c: reports.append(m), output_dir=tmp_path / "two")
    assert double.keys() == single.keys() and double["workers"] == 2
    assert [r["step"] for r in reports if "eta_s" in r] == [2, 4]  # relayed from rank 0
    one = pd.read_csv(tmp_path / "one" / "per_image.csv")
    two = pd.read_csv(tmp_path / "two" / "per_image.csv")
    assert one[["image", "region", "metric"]].equals(two[["image", "region", "metric"]])
    # Same global batches, averaged gradients: only stochastic depth differs between the runs.
    assert abs(double["psnr_entire"] - single["psnr_entire"]) < 0.5
    assert abs(double["final_loss"] - single["final_loss"]) < 0.1 * single["final_loss"]


def _anchor_after(cfg: TrialConfig, base_path: str, backend: str = "none", workers: int = 1
                  ) -> torch.Tensor:
    """The anchor's parameters, flat, after `cfg.steps` steps of the trainer's rank body on
    `workers` ranks, stochastic depth off (its masks are drawn per rank: the one thing a single
    process cannot reproduce)."""
    stats = distributed.launch(backend, workers, T._train_rank, (cfg, base_path, None, None, 0.0))
    anchor = CascadedFlareRemover.from_checkpoint(base_path, drop_path_rate=0.0).anchor
    anchor.load_state_dict(stats["anchor"])
    return torch.cat([p.detach().reshape(-1) for p in anchor.parameters()])


@pytest.mark.slow
def test_one_ddp_step_on_two_ranks_equals_one_process_on_the_whole_batch(cache):
    # lambda_=0.6: every loss term, the encoder's too; a large lr so that the step is no rounding error
    cfg = tiny(cache, steps=1, log_every=1, lr=0.5)
    base_path = str(ensure_base(cfg))
    start = torch.cat([p.detach().reshape(-1) for p in load_checkpoint(base_path).parameters()])
    single = _anchor_after(cfg, base_path) - start
    double = _anchor_after(cfg.replace(backend="ddp", workers=2), base_path, "ddp", 2) - start
    # Each rank averages its half, DDP averages the ranks: the full-batch mean, summed in another
    # order, so equal to rounding (float32), not bit for bit. Per element, two sources:
    # - each run rounds p - lr*g to float32, within half an ulp of p (<= eps/2 * |p|) of its exact
    #   value, so the two can differ by one ulp of p: eps * |p|, from the update's rounding alone
    #   (an earlier fixed atol of 1e-5 * max|update| = 6.3e-9 was below that: 7.45e-9 was seen);
    # - the gradient's sums run in another order: a weight gradient sums up to B*H*W = 2048
    #   products, whose float32 error grows like sqrt(2048) * eps = 5.4e-6 of the gradient: that,
    #   with ~20x headroom, is rtol = 1e-4 of the update; where the products cancel (a gradient
    #   near 0) that error is relative to the products, not to the result: a floor of
    #   sqrt(2048) * eps * max|update|.
    # Bound = 2 * (eps * |p| + 1e-4 * |update| + sqrt(2048) * eps * max|update|): 2x headroom.
    eps = torch.finfo(torch.float32).eps
    bound = 2 * (eps * start.abs() + 1e-4 * single.abs() + 2048**0.5 * eps * single.abs().max())
    excess = ((double - single).abs() - bound).max().item()
    assert excess <= 0, f"DDP step differs from one process by {excess:.3g} beyond rounding"
    # The bound is far tighter than a wrong gradient: rank 0's half of the batch alone.
    half = _anchor_after(cfg.replace(batch_size=1), base_path) - start
    scale = single.abs().max().item()
    assert scale > 1e-4 and ((half - single).abs() > 100 * bound).any()


@pytest.mark.slow
def test_d_pn_is_gathered_over_ddp_ranks(cache):
    # d(p, n) compares the ground truth with the frozen negative's output: the same samples give
    # the same values on 1 or 2 ranks; rank 0 reports the samples of both.
    cfg = tiny(cache, steps=2, log_every=1)
    base_path = str(ensure_base(cfg))
    one = distributed.launch("none", 1, T._train_rank, (cfg, base_path, None, None, 0.0))["d_pn"]
    two = distributed.launch("ddp", 2, T._train_rank, (cfg.replace(backend="ddp", workers=2),
                                                       base_path, None, None, 0.0))["d_pn"]
    assert one["count"] == two["count"] == 4
    for key in ("mean", "min", "max", "p50"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_trial_matches_the_cpu_structure(cache, tmp_path):
    cfg = tiny(cache, device="cuda", precision="bf16", channels_last=True)
    result = T.train(cfg, output_dir=tmp_path)
    assert result["device"].startswith("cuda") and result["images_per_s"] > 0
    assert 0 < result["psnr_entire"] < 100 and result["final_loss"] == result["final_loss"]


def test_ddp_rejects_a_batch_that_does_not_split_evenly(cache):
    with pytest.raises(T.UserError, match="divisible"):
        T.train(tiny(cache, batch_size=3, backend="ddp", workers=2))


def test_cli_rejects_a_misspelt_key_in_one_line(tmp_path, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text("lambda_: 0.5\n")
    with pytest.raises(SystemExit) as exit_:
        T.main(["--config", str(config), "--set", "lamda_=0.3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert "lamda_" in err and "did you mean 'lambda_'" in err


def test_step_seeds_differ_by_step_and_rank_and_batches_are_disjoint():
    seeds = {T.step_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    cfg = TrialConfig.from_dict({"batch_size": 4})
    assert B.step_indices(cfg, 2).tolist() == [8, 9, 10, 11]


def test_non_finite_loss_error_survives_pickling_across_processes():
    import pickle

    exc = pickle.loads(pickle.dumps(T.NonFiniteLossError(7, {"loss": float("nan"), "reg": 1.0})))
    assert isinstance(exc, T.NonFiniteLossError) and exc.step == 7 and "step 7" in str(exc)
