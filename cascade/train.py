"""One trial of the ablation, end to end: `train(cfg) -> dict`, and `python -m cascade.train`.

A trial (cfg.kind):
- "cascade": build the cascade from the base network (`cascade.pretrain.ensure_base`), fine-tune its
  anchor with the paper's loss (`cascade.losses.cascade_loss`: k, lambda_, delta, margin,
  reduction; the encoder's `encoder_features`) for `cfg.steps` optimizer steps, then evaluate the
  anchor's output on the test set;
- "reference" (Table 1's "Uformer" row): evaluate the base network alone, no training,
  through exactly the same evaluation path (`cascade.evaluate.evaluate_model`);
- "control": evaluate the cascade at 0 steps (negative and anchor both the base: the base applied
  to its own output), no training, through the same path: the part of a cascade cell's
  difference to the reference that the double pass alone makes.

Training semantics
- Global batch = `batch_size` images per optimizer step, whatever the number of workers: with
  `backend: ddp` (or `horovod`) and `workers: N`, each of N processes gets a rank-disjoint 1/N of
  every global batch (`batch_size % workers == 0`) and gradients are averaged over ranks, so a step
  is a single-process step on the whole batch and `lr` is *not* scaled with N (scale it yourself
  if you also grow `batch_size`). Only rank 0 checkpoints, reports, evaluates and writes.
- Data is a pure function of (seed, step): step s uses sample indices s*B .. s*B+B-1 of the
  training pairs (`ProceduralPairs(crop, seed, frame=max(crop, test_size))` or
  `Flare7KPairs(data, backgrounds, crop, seed)`, both erasing a box with probability
  `random_erasing` in `random_erasing_on`: the background or the input); the global torch RNG
  (stochastic depth in the anchor) is reseeded from (seed, step, rank) each step. Together with
  the checkpointed model/optimizer/schedule state, an interrupted and resumed run on the CPU ends
  with weights bit-identical to an uninterrupted one.
- Stream cache (`stream_cache`, on by default; `cascade.stream_cache`): gt, the negative's output
  and f(positive)/f(negative) of each step are the same in every cascade trial of one stream
  (seed, data, base, encoder, crop, batch, ...), so they are read from shards the first trial to
  need them computed and wrote; the anchor, f(anchor), the loss and the backward run as always.
  Bit-identical to computing them in the step (tests/test_stream_cache.py).
- The negative network runs without a graph, f(positive)/f(negative) likewise (inside
  `cascade_loss`); on CUDA `precision: bf16` autocasts the networks and the perceptual encoder;
  the loss arithmetic stays float32 (cascade.losses); `channels_last` changes the memory format.
  Losses are read back to the host only every `log_every` steps (and at checkpoint
  steps): a non-finite loss is recorded on the device at the step it happens and raised as
  `NonFiniteLossError` (naming that step and the loss terms) at the next such point, before any
  checkpoint could store the broken weights.
- Checkpoints: every `checkpoint_every` steps and at the end, `checkpoint_dir/last.pt` (atomic);
  a trial given a folder with a checkpoint resumes from it (its config must match, see
  `config.RESUME_MAY_CHANGE`).
- d(p, n) = ||f(p) - f(n)||^2 of every training sample, and whether its triplet hinge was active,
  are kept (`cascade.losses.DistanceStats`, gathered over ranks, carried through checkpoints) and
  summarised in metrics.json's `d_pn`: the margin only lets the triplet vanish below them.

Evaluation: `cascade.evaluate.evaluate_model` on the test set that
`cascade.data.testset.ensure_test_data` names, through the official output path of
`cfg.base_kind` / `cfg.eval_mode`, with LPIPS when its weights are there (`cfg.lpips_weights` or
the torch hub cache; built before anything is written, so a bad weights file fails first).

Outputs in `output_dir` (all atomic): config.json, metrics.json (the returned dict), per_image.csv,
samples/<stem>.png for the first `n_samples` test images. Nothing is written when output_dir is None.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade import checkpoint as ckpt
from cascade.config import (
    RESUME_MAY_CHANGE,
    VIEW_MODES,
    TrialConfig,
    check_base_kind,
    inference_mode,
)
from cascade.data.batches import batches, build_pairs, data_loader
from cascade.data.testset import PairedTestSet, ensure_test_data
from cascade.device import resolve_device, use_bf16
from cascade.distributed import DataParallel, Report, check_backend, launch
from cascade.errors import UserError, cli_errors
from cascade.fmt import duration, psnr_text
from cascade.io import atomic_path, atomic_write_json
from cascade.losses import DistanceStats
from cascade.pretrain import ensure_base
from cascade.seeds import derive_seed

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "reg", "perceptual", "triplet")  # "loss" is LossTerms.total
_NEVER = 2**62  # "no non-finite step yet" (min-reduced over ranks)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `step` (1-based optimizer step) and `terms`.

    Not a UserError: the config was valid; the run diverged (too large an lr, or a bug). The
    orchestrator records it in error.json with its step and marks the trial failed.
    """

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        self.step, self.terms = step, terms
        detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at step {step}: {detail} (lower lr, or check the data)")

    def __reduce__(self) -> tuple[type, tuple[int, dict[str, float]]]:
        # Exceptions pickle as cls(*args); ours takes (step, terms). Needed to cross processes (DDP).
        return type(self), (self.step, self.terms)


# -- building blocks -------------------------------------------------------------------------------


def build_optimizer(cfg: TrialConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (the paper's, lr 1e-3), Adam or AdamW with cfg's lr / momentum / weight_decay."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.momentum, 0.999) if cfg.momentum > 0 else (0.9, 0.999)  # momentum = beta1 if set
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrialConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """"constant" or "cosine" (to 0 at `steps`); stepped once per optimizer step."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global torch RNG for one step of one rank (63-bit, from sha256)."""
    return derive_seed("flaresweep-step", seed, step, rank, shift=1)


# -- training (one rank) -----------------------------------------------------------------------------


def _train_rank(dp: DataParallel, report: Report | None, cfg: TrialConfig, base_path: str,
                checkpoint_dir: str | None, testset: PairedTestSet | None = None,
                drop_path_rate: float | None = None) -> dict[str, Any] | None:
    """Fine-tune the anchor on this rank's shards; rank 0 returns the anchor's weights and stats.

    With `cfg.eval_every`, rank 0 also evaluates on `testset` (train()'s, already validated; it
    holds paths only, so it pickles to spawned ranks) every that many steps (not at the last:
    train() evaluates then) and reports the metrics with that step. `drop_path_rate` overrides
    the base's stochastic depth (None: the checkpoint's); tests set 0 to compare ranks with one
    process, the masks being the one thing drawn per rank.
    """
    from cascade.encoders import build_encoder
    from cascade.losses import CascadeLoss
    from cascade.model import CascadedFlareRemover

    device = dp.device
    if device.type == "cuda":  # cuBLAS needs this for deterministic algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also NaN-fills every uninitialised allocation by default: ~450 extra fills
    # per Uformer forward+backward, 11% of a CPU training step (docs/performance.md). Every op of
    # the step writes the whole tensor it allocates, so results do not depend on it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        torch.manual_seed(cfg.seed)
        overrides = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        model = CascadedFlareRemover.from_checkpoint(base_path, **overrides).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()  # the anchor trains (stochastic depth); the negative stays in eval mode
        anchor, negative = model.anchor, model.negative
        needs_encoder = cfg.lambda_ < 1 or cfg.delta > 0
        encoder = (build_encoder(cfg.encoder, cfg.encoder_pretrained, cfg.encoder_weights,
                                 features=cfg.encoder_features).to(device)
                   if needs_encoder else None)
        criterion = CascadeLoss(encoder, cfg.k, cfg.lambda_, cfg.delta, cfg.margin, cfg.reduction)
        # Wrap before the scheduler binds to it: Horovod's DistributedOptimizer is a new object.
        optimizer = dp.wrap_optimizer(build_optimizer(cfg, anchor.parameters()), anchor)
        scheduler = build_scheduler(cfg, optimizer)

        start, history = 0, {}
        state = ckpt.load_training_checkpoint(checkpoint_dir, device) if checkpoint_dir else None
        if state is not None:
            ckpt.check_resumable(state["config"], cfg.to_dict(), RESUME_MAY_CHANGE, where=checkpoint_dir)
            start = ckpt.restore_training_state(state, model=anchor, optimizer=optimizer,
                                                scheduler=scheduler)
            history = state["extra"]
            if dp.is_main:
                log.info("resuming from %s at step %d/%d", checkpoint_dir, start, cfg.steps)
        net = dp.wrap_model(anchor)
        dp.broadcast_state(anchor, optimizer)
        if cfg.compile:
            net = torch.compile(net)

        evaluate = None
        if cfg.eval_every and dp.is_main and testset is not None:
            from cascade.evaluate import evaluate_model, evaluation_summary, prepare_lpips

            lpips = prepare_lpips(cfg, device)  # one scorer for every evaluation of the run

            def evaluate() -> dict[str, Any]:
                """Metrics of the cascade as it stands (the anchor back in train mode after)."""
                per_image, _ = evaluate_model(model, testset, cfg, device, lpips)
                model.train()
                return evaluation_summary(per_image)

        loop = _Loop(cfg, dp, report, checkpoint_dir, start, history, evaluate)
        bf16 = use_bf16(cfg, device)
        pairs = build_pairs(cfg)
        if dp.is_main and cfg.data is not None and data_loader(pairs) != cfg.evaluated_base_kind:
            log.warning("base_kind %s, but %s holds %s data: the training pairs follow the %s "
                        "loader, not the one the base was trained with", cfg.evaluated_base_kind,
                        cfg.data, data_loader(pairs), data_loader(pairs))
        stream = None
        if cfg.stream_cache and start < cfg.steps:  # (a re-evaluation resumes at the last step)
            # gt, n and f(p)/f(n) of each step from the stream cache, shared with the trials of
            # the same stream; the shards nobody wrote yet are computed here (cascade.stream_cache).
            from cascade.stream_cache import StreamCache

            stream = StreamCache.for_trial(
                cfg, negative, criterion, pairs, lambda r: batches(pairs, cfg, dp, r.start, r.stop),
                device, bf16, dp.rank, dp.world_size)
            if dp.is_main:
                log.info("stream cache %s", stream.folder)
        for step, item in enumerate(batches(pairs, cfg, dp, start) if stream is None
                                    else stream.steps(start, cfg.steps), start):
            torch.manual_seed(step_seed(cfg.seed, step, dp.rank))
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                if stream is None:
                    inp, gt, _flare = item
                    if cfg.channels_last:
                        inp = inp.contiguous(memory_format=torch.channels_last)
                    with torch.no_grad():  # the negative is fixed: no graph
                        neg = negative(inp)[:, :3]  # (B/W, 3, S, S): the hard negative
                    targets = None  # f(p), f(n): computed by the loss
                else:  # the same tensors, computed once per stream (strides included)
                    gt, neg, targets = item
                anc = net(neg)[:, :3]  # (B/W, 3, S, S): the anchor sample, with a graph
                terms = criterion(anc.float(), gt, neg.float(), targets)
            total = terms.total
            if cfg.fail_at_step is not None and step + 1 == cfg.fail_at_step:
                total = total * float("nan")  # test hook: a divergence at a known step
            # set_to_none is torch's default (>= 2.0); Horovod's DistributedOptimizer.zero_grad
            # takes no arguments, keeps its pending-allreduce check and calls torch's.
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            scheduler.step()
            loop.after_step(step + 1, torch.stack([total.detach(), terms.reg.detach(),
                                                   terms.perceptual.detach(), terms.triplet.detach()]),
                            anchor, optimizer, scheduler, terms.d_pn, terms.hinge_active)
        loop.finish()
        if not dp.is_main:
            return None
        return {"anchor": {k: v.detach().cpu() for k, v in anchor.state_dict().items()},
                "weights_source": encoder.weights_source if encoder is not None else None,
                "data_loader": data_loader(pairs),
                "stream_cache": stream.stats() if stream is not None else None, **loop.stats()}
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


class _Loop:
    """Bookkeeping of the step loop: device-side loss sums, sync points, checkpoints, reports."""

    def __init__(self, cfg: TrialConfig, dp: DataParallel, report: Report | None,
                 checkpoint_dir: str | None, start: int, history: dict[str, Any],
                 evaluate: Callable[[], dict[str, Any]] | None = None) -> None:
        self.cfg, self.dp, self.report, self.checkpoint_dir = cfg, dp, report, checkpoint_dir
        self.evaluate = evaluate  # rank 0 with eval_every: the test-set metrics of the model now
        self.eval_s = 0.0  # spent in those evaluations; left out of the training time and rate
        self.start = self.last_sync = start
        # Throughput and last loss terms of the runs before a resume (checkpoint "extra").
        self.prior_s = float(history.get("train_s", 0.0))
        self.prior_steps = int(history.get("steps_trained", 0))
        dev = dp.device
        self.sums = torch.zeros(len(LOSS_TERMS), device=dev, dtype=torch.float64)
        self.first_bad = torch.full((), _NEVER, device=dev, dtype=torch.int64)
        self.bad_terms = torch.zeros(len(LOSS_TERMS), device=dev, dtype=torch.float64)
        self.t0 = time.perf_counter()
        self.last_terms: dict[str, float] = dict(history.get("final_terms", {}))
        self.done = start
        # d(p, n) of the runs before a resume (every rank's, already gathered) and of this run's
        # steps on this rank (device tensors, no host sync per step).
        self.prior_distances = DistanceStats()
        self.prior_distances.load_state_dict(history.get("d_pn", {"d_pn": [], "hinge_active": []}))
        self.distances = DistanceStats()
        self.d_pn: dict[str, Any] | None = None

    def after_step(self, done: int, terms: torch.Tensor, model: nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: Any, d_pn: torch.Tensor,
                   hinge_active: torch.Tensor) -> None:
        """`done` optimizer steps taken; terms (4,) on the device; d_pn / hinge_active (B/W,) of
        this rank's samples (`LossTerms`; empty when lambda_ == 1). Syncs only at log/ckpt steps."""
        self.distances.update(d_pn, hinge_active)
        terms = terms.to(torch.float64)
        self.sums += terms
        # First non-finite step, recorded without a host sync (torch.where on the device).
        new_bad = ~torch.isfinite(terms).all() & (self.first_bad == _NEVER)
        self.first_bad = torch.where(new_bad, torch.full_like(self.first_bad, done), self.first_bad)
        self.bad_terms = torch.where(new_bad, terms, self.bad_terms)
        self.done = done
        log_now = done % self.cfg.log_every == 0 or done == self.cfg.steps
        ckpt_now = self.checkpoint_dir is not None and (
            done % self.cfg.checkpoint_every == 0 or done == self.cfg.steps)
        if log_now or ckpt_now:
            self._check_finite()
        if log_now:
            self._average_terms(done)  # before saving, so the checkpoint holds this window's means
        saved = None
        if ckpt_now:
            distances = self.all_distances()  # a collective: every rank, before rank 0 saves
            if self.dp.is_main:
                saved = self._save(done, model, optimizer, scheduler, distances)
        evaluated: dict[str, Any] = {}
        if self.evaluate is not None and done % self.cfg.eval_every == 0 and done < self.cfg.steps:
            t0 = time.perf_counter()
            evaluated = self.evaluate()
            took = time.perf_counter() - t0
            self.eval_s += took
            log.info("step %d/%d  %s (test set, %.1fs)", done, self.cfg.steps,
                     psnr_text(evaluated, ("entire", "streak", "glare")), took)
        if log_now and self.dp.is_main:
            self._log(done, saved, evaluated)
        elif evaluated and self.report is not None:
            self.report({"step": done, "steps": self.cfg.steps, **evaluated}, saved)

    def _check_finite(self) -> None:
        first = self.dp.all_reduce(self.first_bad, op="min")
        if int(first) == _NEVER:
            return
        # The terms of the rank(s) that saw the first bad step (NaN survives the sum).
        mine = (self.first_bad == first).to(torch.float64)
        terms = self.dp.all_reduce(self.bad_terms * mine, op="sum") / self.dp.all_reduce(mine, op="sum")
        raise NonFiniteLossError(int(first), dict(zip(LOSS_TERMS, terms.tolist())))

    def all_distances(self) -> DistanceStats:
        """d(p, n) of every step so far, on every rank (a collective): prior runs, then this run's
        samples in rank order."""
        out = DistanceStats()
        out.extend(self.prior_distances)
        out.extend(self.distances.gathered(self.dp.all_reduce, self.dp.rank, self.dp.world_size,
                                           self.dp.device))
        return out

    def _save(self, done: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              distances: DistanceStats) -> str:
        history = {"train_s": self.prior_s + self._elapsed(),
                   "steps_trained": self.prior_steps + done - self.start,
                   "final_terms": self.last_terms, "d_pn": distances.state_dict()}
        ckpt.save_training_checkpoint(self.checkpoint_dir, step=done, model=model, optimizer=optimizer,
                                      scheduler=scheduler, config=self.cfg.to_dict(), extra=history)
        return str(self.checkpoint_dir)

    def _average_terms(self, done: int) -> None:
        """Mean loss terms over the steps since the last log and over ranks (a collective)."""
        n = done - self.last_sync
        means = (self.dp.all_reduce(self.sums, op="sum") / (n * self.dp.world_size)).tolist()
        self.sums.zero_()
        self.last_sync = done
        self.last_terms = dict(zip(LOSS_TERMS, means))

    def _elapsed(self) -> float:
        """Training seconds of this run so far (mid-training evaluations left out)."""
        return time.perf_counter() - self.t0 - self.eval_s

    def _log(self, done: int, checkpoint_dir: str | None, evaluated: dict[str, Any]) -> None:
        means = [self.last_terms[k] for k in LOSS_TERMS]
        elapsed = self._elapsed()
        rate = (done - self.start) * self.cfg.batch_size / max(elapsed, 1e-9)
        eta = (self.cfg.steps - done) * elapsed / max(done - self.start, 1)
        metrics = {"step": done, "steps": self.cfg.steps, **self.last_terms,
                   "images_per_s": rate, "eta_s": eta, **evaluated}
        log.info("step %d/%d  loss %.4g (reg %.4g, perceptual %.4g, triplet %.4g)  %.1f img/s  ETA %s",
                 done, self.cfg.steps, *means, rate, duration(eta))
        if self.report is not None:
            self.report(metrics, checkpoint_dir)

    def finish(self) -> None:
        """After the loop (also when it had nothing left to do, e.g. resumed at the last step).

        No finiteness check here: the last step (done == steps) always logs, which checks.
        Every rank calls it: the d(p, n) summary is gathered over ranks.
        """
        self.train_s = self._elapsed()
        self.d_pn = self.all_distances().to_dict()

    def stats(self) -> dict[str, Any]:
        """Throughput over every run of this trial (a resumed one included)."""
        trained = self.prior_steps + self.done - self.start
        train_s = self.prior_s + self.train_s
        return {"steps": self.cfg.steps, "train_s": train_s,
                "images_per_s": trained * self.cfg.batch_size / train_s if trained else None,
                "step_s": train_s / trained if trained else None,
                "final_terms": self.last_terms, "d_pn": self.d_pn}


# -- the trial ----------------------------------------------------------------------------------------


def train(cfg: TrialConfig, report: Report | None = None, checkpoint_dir: str | os.PathLike | None = None,
          output_dir: str | os.PathLike | None = None, *, metrics_file: bool = True) -> dict[str, Any]:
    """Run one trial; return its summary (metrics.summarize keys + provenance and throughput).

    `metrics_file=False`: the caller records the returned dict itself (a sweep's results record,
    orchestrator.record, is the one writer of its metrics.json files).

    report(metrics, checkpoint_dir) is called every `log_every` steps (step, loss terms,
    images_per_s, eta_s; checkpoint_dir when a checkpoint was just written, else None) and once at
    the end with the returned dict. checkpoint_dir defaults to output_dir/checkpoints (None when
    both are None: no checkpoints). See the module docstring for what is written.
    """
    from cascade.encoders import check_encoder_name
    from cascade.evaluate import evaluate_model, evaluation_summary, prepare_lpips
    from cascade.model import CascadedFlareRemover, official_light_threshold
    from cascade.uformer import infer_arch, load_checkpoint, read_state_dict

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = Path(output_dir).resolve() if output_dir is not None else None
    ckdir = (Path(checkpoint_dir).resolve() if checkpoint_dir is not None
             else out / "checkpoints" if out is not None else None)
    cfg.validate()  # a TrialConfig built directly (not via from_dict) is checked here
    check_backend(cfg.backend)  # e.g. Horovod missing: say so before building a base or test set
    check_encoder_name(cfg.encoder)  # timm:<model> that timm lacks: before anything is written
    if cfg.checkpoint is not None:  # base_kind against the file, before anything is written
        check_base_kind(cfg.checkpoint, cfg.base_kind,
                        infer_arch(read_state_dict(cfg.checkpoint), where=cfg.checkpoint)["output_ch"])
    lpips = prepare_lpips(cfg, device)  # a bad lpips_weights file: refused before anything is written
    if out is not None:
        atomic_write_json(out / "config.json", cfg.to_dict())
    base_path = ensure_base(cfg)
    test_dir = ensure_test_data(cfg)
    # Validated (every image decoded) once, before spending time on training; evaluation reuses it.
    testset = PairedTestSet(test_dir)

    stats: dict[str, Any] = {"steps": 0, "train_s": 0.0, "images_per_s": None, "step_s": None,
                             "final_terms": {}, "weights_source": None, "d_pn": None,
                             "data_loader": None}
    if cfg.kind == "cascade":
        stats = launch(cfg.backend, cfg.workers, _train_rank,
                       (cfg, str(base_path), str(ckdir) if ckdir is not None else None, testset),
                       device=device, report=report)
        model: nn.Module = CascadedFlareRemover.from_checkpoint(base_path)
        model.anchor.load_state_dict(stats.pop("anchor"))
    elif cfg.kind == "control":
        model = CascadedFlareRemover.from_checkpoint(base_path)  # the anchor as the base left it
    else:
        model = load_checkpoint(base_path)
    model = model.to(device)

    t_eval = time.perf_counter()
    per_image, samples = evaluate_model(model, testset, cfg, device, lpips)
    eval_s = time.perf_counter() - t_eval
    cascade_run = cfg.kind == "cascade"
    result = {
        **evaluation_summary(per_image),  # PSNR/SSIM, lpips_entire and how LPIPS was computed
        "kind": cfg.kind,
        "k": cfg.k if cascade_run else None,
        "lambda_": cfg.lambda_ if cascade_run else None,
        "delta": cfg.delta if cascade_run else None,
        "margin": cfg.margin if cascade_run else None,
        "reduction": cfg.reduction if cascade_run else None,
        "encoder_features": cfg.encoder_features if cascade_run else None,
        "d_pn": stats["d_pn"],  # the measured d(p, n) (DistanceStats.to_dict), beside the margin
        "random_erasing": cfg.random_erasing if cascade_run else None,
        "random_erasing_on": cfg.random_erasing_on if cascade_run and cfg.random_erasing else None,
        "data_loader": stats["data_loader"],
        "seed": cfg.seed,
        "encoder": cfg.encoder if cascade_run else None,
        "encoder_pretrained": cfg.encoder_pretrained if cascade_run else None,
        "weights_source": stats["weights_source"],
        # The evaluation path: the official output for this kind of base, in this mode.
        "base_kind": cfg.evaluated_base_kind,
        "eval_mode": cfg.eval_mode,
        "eval_size": cfg.eval_size if cfg.eval_mode in VIEW_MODES else None,
        "light_threshold": official_light_threshold(cfg.evaluated_base_kind,
                                                    inference_mode(cfg.eval_mode)),
        "steps": stats["steps"],
        "images_per_s": stats["images_per_s"],
        "step_s": stats["step_s"],
        "train_s": stats["train_s"],
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - t0,
        **{f"final_{k}": v for k, v in stats["final_terms"].items()},
        "test_data_dir": str(test_dir),
        "base_checkpoint": str(base_path),
        "device": str(device),
        "backend": cfg.backend,
        "workers": cfg.workers,
        # rank 0's stream cache: its folder, steps it built and steps it read (None: off)
        "stream_cache": stats.get("stream_cache"),
    }
    if out is not None:
        from cascade.data.images import write_png

        with atomic_path(out / "per_image.csv", suffix=".csv") as tmp:
            per_image.to_csv(tmp, index=False)
        for stem, pred in samples:
            write_png(out / "samples" / f"{stem}.png", pred)
        if metrics_file:
            atomic_write_json(out / "metrics.json", result)
    if report is not None:
        report(result, str(ckdir) if ckdir is not None and cascade_run else None)
    return result


# -- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cascade.train",
        description="Run one flaresweep trial (no Ray): train the cascade or evaluate the reference, "
                    "write config.json, metrics.json, per_image.csv and samples/ to --output-dir.")
    parser.add_argument("--config", required=True, help="YAML or JSON file of TrialConfig fields")
    parser.add_argument("--output-dir", help="results folder (default: results/train/<config hash>)")
    parser.add_argument("--checkpoint-dir", help="checkpoint folder (default: OUTPUT_DIR/checkpoints)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set lambda_=0.4")
    return parser


@cli_errors
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    cfg = TrialConfig.from_file(args.config, args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.output_dir or Path("results") / "train" / cfg.digest())
    # Opened at the first progress report: a config or input error stays the only line on stderr.
    bars: list[Any] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if "eta_s" in metrics:  # a progress report (the final one carries the summary)
            if not bars:
                bars.append(tqdm(total=cfg.steps, unit="step", dynamic_ncols=True))
            bar = bars[0]
            bar.update(metrics["step"] - bar.n)
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in (*LOSS_TERMS, "images_per_s")})

    try:
        result = train(cfg, report=report, checkpoint_dir=args.checkpoint_dir, output_dir=out)
    except NonFiniteLossError as exc:
        for bar in bars:
            bar.close()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except UserError:
        for bar in bars:
            bar.close()
        raise
    for bar in bars:
        bar.close()
    keys = [k for k in ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak",
                        "ssim_glare", "lpips_entire", "images_per_s", "wall_s")
            if result.get(k) is not None]
    print(f"{out}: " + ", ".join(f"{k}={result[k]:.4g}" for k in keys))
    return result


if __name__ == "__main__":
    main()
