"""The trial: training reduces the loss, negative frozen, exact resume, reference path, NaN error,
DDP with 2 CPU ranks, and the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cascade import distributed
from cascade import train as T
from cascade.config import TrialConfig
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
    pd.testing.assert_frame_equal(written, direct, check_dtype=False, check_exact=False, rtol=1e-12)
    expected = summarize(direct)
    for key in ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "score", "n_images"):
        assert result[key] == expected[key], key
    assert result["n_images"] == len(ts) and result["steps"] == 0 and result["kind"] == "reference"
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
    # order, so equal to rounding (float32), not bit for bit.
    scale = single.abs().max().item()  # measured: 0.017; the ranks differ from it by <= 1e-8
    atol = 1e-5 * scale
    torch.testing.assert_close(double, single, rtol=1e-4, atol=atol)
    # The tolerance is far tighter than a wrong gradient: rank 0's half of the batch alone.
    half = _anchor_after(cfg.replace(batch_size=1), base_path) - start
    assert scale > 1e-3 and (half - single).abs().max().item() > 100 * atol


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
    assert T.step_indices(cfg, 2).tolist() == [8, 9, 10, 11]


def test_non_finite_loss_error_survives_pickling_across_processes():
    import pickle

    exc = pickle.loads(pickle.dumps(T.NonFiniteLossError(7, {"loss": float("nan"), "reg": 1.0})))
    assert isinstance(exc, T.NonFiniteLossError) and exc.step == 7 and "step 7" in str(exc)
