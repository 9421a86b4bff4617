"""TrialConfig: everything one trial needs, frozen, built once from a plain dict.

One name, one meaning: `k`, `lambda_`, `delta`, `margin`, ... are spelled the same in the
search-space YAML, here, in the results' `config.json` and in the Table 1 DataFrame columns.
`TrialConfig.from_dict` rejects unknown keys (a typo in a search space is an error naming the key,
never a silent default) and out-of-range values, raising `UserError`.

The field classes below (RUNTIME_FIELDS, ID_FIELDS, RESUME_MAY_CHANGE, PATH_FIELDS, BASE_FIELDS,
TEST_FIELDS, EVAL_FIELDS) say what each field is to a trial's identity, its resume check and its
caches; they live here, beside the fields, so that adding a field means deciding its class in one
place.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from cascade.errors import UserError, first_line
from cascade.io import FLOAT_LITERAL, digest, parse_yaml

# Torch-free on purpose: `sweep.py status` and `table1` load configs without importing torch.
DEFAULT_DELTA = 1e-3
"""Weight of L_PL; the paper's value."""

DEFAULT_MARGIN = 0.1
"""Triplet margin alpha, in the units of L_triplet's distances: an MSE over the embedding.

The paper gives no value. The margin must stay below the typical ||f(p) - f(n)||^2 (ground truth
vs. first-stage output): only then does the triplet term vanish when the anchor reaches the ground
truth (a = p gives [0 - d(p, n) + margin]_+ = 0). A larger margin keeps pushing the anchor past
the ground truth, away from the negative. Embeddings of the default encoders end in a LayerNorm or
a global average pool, so they are O(1) per dimension and the MSE between two versions of one scene
that differ by a visible flare is expected to be of order 0.1 to 1; 0.1 sits at the low end of that
range. This is an estimate, not a measurement with the SWAG weights: `margin` is a search-space
parameter (search_spaces/lambda_optuna.yaml searches it log-uniformly in [0.01, 1]).

In the units of d under `reduction`: with `sum` it is D (or N*D for `encoder_features: tokens`)
times the MSE units; it is never rescaled, so a `sum` search space must scale `margin` itself.
metrics.json's `d_pn` records the measured d(p, n).
"""

ENCODER_NAMES = ("vit_l16_swag", "vit_l16_swag_e2e", "small_cpu", "flare_seg")
"""The names of cascade.encoders.ENCODERS (a test keeps them equal), checked without importing it."""
TIMM_PREFIX = "timm:"
"""Encoder names with this prefix name a timm model (cascade.encoders)."""
REDUCTIONS = ("mean", "sum")
"""cascade.losses.REDUCTIONS (a test keeps them equal), checked without importing torch."""
ENCODER_FEATURES = ("cls", "tokens")
"""cascade.encoders.ENCODER_FEATURES (a test keeps them equal), checked without importing torch."""
BASE_KINDS = ("flare7k", "flare7kpp")
"""cascade.model.BASE_KINDS (a test keeps them equal): which Flare7K release a base network is."""
PROCEDURAL_BASE_KIND = "flare7kpp"
"""What the procedural base is evaluated as. Its ground truth keeps the light source
(cascade.data.synthetic: the Flare7K++ convention), so, like the released Flare7K++ Uformer, the
network reconstructs the light itself and its output is used as it is (no light-source re-blend)."""
INFERENCE_MODES = ("native", "flare7k-large")
"""cascade.model.MODES (a test keeps them equal): tiles at native resolution (test.py on the
512x512 test sets) or Flare7K's test_large.py (short side to 512, flare transferred back)."""
VIEW_MODES = ("resize-bilinear", "resize-bicubic", "resize-area", "resize-bilinear-noaa",
              "center-crop", "tiles")
"""cascade.data.views.VIEWS (a test keeps them equal): the readings of the paper's "images of size
128x128 were used" for evaluation. Each turns a test image (input, gt and mask alike) into one or
more `eval_size` views, predicted in "native" mode and scored at that size."""
EVAL_MODES = INFERENCE_MODES + VIEW_MODES
"""How a test image becomes a scored prediction: an inference mode at the image's own size, or a
view at `eval_size` (VIEW_MODES)."""
DATA_LOADERS = ("flare7k", "flare7kpp")
"""cascade.data.flare7k.LOADERS (a test keeps them equal): the official pair loaders."""
def inference_mode(eval_mode: str) -> str:
    """The inference mode (INFERENCE_MODES) an evaluation mode predicts with: itself, or "native"
    for the views of VIEW_MODES (each view is predicted whole at its own size)."""
    return eval_mode if eval_mode in INFERENCE_MODES else "native"


ERASING_TARGETS = ("background", "input")
"""Where a random-erasing box goes (cascade.data.erasing): "background" erases the flare-free
background before the flare is added (the box is in the input and in the ground truth: the paper's
"the background images were augmented using ... random erasing"); "input" erases the network's
input only (the ground truth keeps the content: Zhong et al.'s occlusion augmentation)."""
LPIPS_CONVENTIONS = ("flare7k", "standard")
"""The names of cascade.lpips_score.LPIPS_CONVENTIONS (a test keeps them equal)."""

KINDS = ("cascade", "reference", "control")
"""cascade: fine-tune the anchor; reference: the base network alone (Table 1's Uformer row);
control: the cascade at 0 steps (the base applied to its own output), evaluation only: how much of
a cell's difference to the reference is the double pass rather than the fine-tuning."""
EVAL_ONLY_KINDS = ("reference", "control")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("none", "ddp", "horovod")
PROTOCOLS = ("masked", "flare7k")
SSIM_WINDOWS = ("uniform", "gaussian")


@dataclass(frozen=True)
class TrialConfig:
    """One trial of the ablation. Defaults are the paper's settings where it gives them."""

    # -- what the trial is ---------------------------------------------------------------------
    # "cascade": fine-tune the anchor; "reference": evaluate the base alone; "control": evaluate the
    # cascade at 0 steps (negative and anchor both the base), no training
    kind: str = "cascade"
    seed: int = 0

    # -- loss: L = lambda_*L_REG(k) + delta*L_PL + (1 - lambda_)*L_triplet(margin) ---------------
    k: int = 2  # norm of L_REG: 1 (mean absolute error) or 2 (mean squared error)
    lambda_: float = 0.6  # in [0, 1]
    delta: float = DEFAULT_DELTA  # >= 0
    margin: float = DEFAULT_MARGIN  # triplet margin alpha, >= 0
    # norms per sample: "mean" (MAE/MSE over elements) or "sum" (per-sample sums); both
    # batch-averaged; margin is in its units
    reduction: str = "mean"

    # -- perceptual encoder f (cascade.encoders) -----------------------------------------------
    encoder: str = "vit_l16_swag"  # a name from cascade.encoders.ENCODERS or "timm:<model>"
    encoder_pretrained: bool = True  # False only when asked for (CPU demo); recorded in results
    encoder_weights: str | None = None  # local weights file (clusters without internet)
    # "cls": pooled embedding (ViT class token); "tokens": patch tokens / unpooled map, (B, N*D)
    encoder_features: str = "cls"

    # -- base network ---------------------------------------------------------------------------
    checkpoint: str | None = None  # Flare7K(++) Uformer .pth; None: train a base on procedural data
    # Which release `checkpoint` is: "flare7k" (v1: the evaluation blends the light source back
    # from the input, as test.py does) or "flare7kpp" (channels 0:3 as they are). Required with a
    # checkpoint: both released Uformers have 6 output channels, so the file cannot tell. None
    # without one: the procedural base, evaluated as PROCEDURAL_BASE_KIND.
    base_kind: str | None = None
    # Architecture of the procedural base (a checkpoint's architecture is read from the file).
    embed_dim: int = 32
    depth: int = 2  # LeWin blocks per stage, all 9 stages
    win_size: int = 8
    output_ch: int = 6  # 6: deflared image + flare (both released Uformers); 3: deflared image only
    base_steps: int = 2000  # training steps of the procedural base
    base_lr: float = 2e-4  # Adam, as Flare7K trains its Uformer
    base_cache: str | None = None  # folder caching procedural bases by config hash

    # -- data -----------------------------------------------------------------------------------
    data: str | None = None  # Flare7K / Flare7K++ root; None: procedural benchmark
    backgrounds: str | None = None  # flare-free backgrounds (Flickr24K); required with `data`
    # Which official loader makes the pairs from `data` (cascade.data.flare7k): "flare7k" (v1:
    # Compound_Flare + Reflective_Flare, brightness jitter and DC offset; Light_Source and Flare-R
    # ignored), "flare7kpp" (light sources in gt), None: by layout (Light_Source folders -> ++).
    data_loader: str | None = None
    test_data: str | None = None  # folder with input/ gt/ mask/; None: procedural test set
    n_test: int = 100  # procedural test images
    test_size: int = 512  # procedural test image side
    crop: int = 128  # training crop side (the paper: 128)
    batch_size: int = 8
    # probability of a random-erasing box per sample (cascade/data/erasing.py), erased in
    # `random_erasing_on`: "background" (before the flare is added: the box is in input and ground
    # truth, the paper's reading) or "input" (the input only)
    random_erasing: float = 0.0
    random_erasing_on: str = "background"
    num_workers: int = 2  # file-decoding loader workers (synthesis itself runs on the device)

    # -- optimisation of the anchor network -----------------------------------------------------
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    steps: int = 1000

    # -- evaluation (cascade.metrics) -----------------------------------------------------------
    protocol: str = "masked"
    ssim_window: str = "uniform"
    # How a test image becomes a prediction (cascade.model.official_output): "native" tiles at the
    # image's own size (= Flare7K's test.py on its 512x512 test sets); "flare7k-large" is
    # test_large.py (short side to 512, 512 px strips, the flare transferred back to full size).
    # VIEW_MODES (cascade.data.views) score `eval_size` views of each test image instead: the
    # paper's "images of size 128x128 were used" read as a resize (bilinear / bicubic / area /
    # bilinear without antialiasing), a centre crop, or the mean over the tiles of that size.
    eval_mode: str = "native"
    eval_size: int = 128  # side of the views of VIEW_MODES (ignored, and not in any id, otherwise)
    # LPIPS input convention (cascade.lpips_score): "flare7k" ([0, 1] without normalize=True, as
    # Flare7K's evaluate.py and its published numbers) or "standard" ([-1, 1]).
    lpips: str = "flare7k"
    # Torchvision-format AlexNet file for LPIPS' trunk; None: the torch hub cache. Never
    # downloaded: without weights, lpips_entire is null and metrics.json says why.
    lpips_weights: str | None = None
    eval_workers: int = 2
    n_samples: int = 4  # test outputs saved as PNG for qualitative figures
    # Also evaluate the anchor every this many steps while training (0: only at the end) and report
    # the metrics: what lets an early-stopping scheduler (ASHA) judge a trial before it finishes.
    eval_every: int = 0

    # -- runtime ----------------------------------------------------------------------------------
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": autocast on CUDA
    channels_last: bool = False
    compile: bool = False
    backend: str = "none"  # data parallel across `workers` processes: "ddp" or "horovod"
    workers: int = 1
    checkpoint_every: int = 100
    log_every: int = 10
    fail_at_step: int | None = None  # test-only: inject a non-finite loss at this step
    # The stream cache (cascade.stream_cache; YAML `on`/`off` are true/false): on, a trial reads
    # the frozen half of each step (gt, the negative's output, f(p)/f(n)) from shards the first
    # trial of the same stream wrote, and writes those it is the first to need; off, every trial
    # computes them. Bit-identical results either way on the CPU (tested). Its folder:
    # `stream_cache_dir` (a sweep passes `<results>/<sweep>/stream`), else `<cache>/stream`
    # (cascade.io.cache_dir); one subfolder per stream key.
    stream_cache: bool = True
    stream_cache_dir: str | None = None

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> TrialConfig:
        """Build and validate a config. `where` names the source (a file) in error messages."""
        if not isinstance(values, dict):
            raise UserError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hint = _close_match(unknown[0], known)
            raise UserError(
                f"{where}: unknown key {unknown[0]!r}{hint}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
        hints = get_type_hints(cls)
        coerced = {name: _coerce(name, value, hints[name], where) for name, value in values.items()}
        cfg = cls(**coerced)
        cfg.validate(where=where)
        return cfg

    @property
    def evaluated_base_kind(self) -> str:
        """The base kind the evaluation applies: `base_kind`, or PROCEDURAL_BASE_KIND without a
        checkpoint (recorded as metrics.json's `base_kind`)."""
        return self.base_kind or PROCEDURAL_BASE_KIND

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; `TrialConfig.from_dict(cfg.to_dict()) == cfg`."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrialConfig:
        """A validated copy with some fields changed."""
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def digest(self, keys: Sequence[str] | None = None) -> str:
        """Stable 12-hex-digit hash (`cascade.io.digest`) of the given fields (all by default)."""
        d = self.to_dict()
        return digest({k: d[k] for k in (keys if keys is not None else d)})

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrialConfig:
        """A config from a YAML/JSON file plus `key=value` overrides (values parsed as YAML)."""
        p = Path(path)
        try:
            values = parse_yaml(p.read_text(encoding="utf-8")) or {}  # JSON is YAML
        except OSError as exc:
            raise UserError(f"{p}: cannot read config ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{p}: not valid YAML/JSON ({first_line(exc)})") from None
        if not isinstance(values, dict):
            raise UserError(f"{p}: expected a mapping of config keys")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--set {item!r}: expected key=value")
            try:
                values[key.strip()] = parse_yaml(value)
            except yaml.YAMLError as exc:
                raise UserError(f"--set {item!r}: not valid YAML ({first_line(exc)})") from None
        return cls.from_dict(values, where=str(p) + (" (with --set)" if overrides else ""))

    def validate(self, *, where: str = "config") -> None:
        """Raise UserError naming the first bad field."""

        def bad(key: str, expected: str) -> UserError:
            return UserError(f"{where}: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        for key, choices in (
            ("kind", KINDS),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("device", DEVICES),
            ("precision", PRECISIONS),
            ("backend", BACKENDS),
            ("protocol", PROTOCOLS),
            ("ssim_window", SSIM_WINDOWS),
            ("reduction", REDUCTIONS),
            ("encoder_features", ENCODER_FEATURES),
            ("eval_mode", EVAL_MODES),
            ("random_erasing_on", ERASING_TARGETS),
            ("lpips", LPIPS_CONVENTIONS),
        ):
            if getattr(self, key) not in choices:
                raise bad(key, "one of " + ", ".join(choices))
        if self.k not in (1, 2):
            raise bad("k", "1 or 2")
        if not (0.0 <= self.lambda_ <= 1.0):
            raise bad("lambda_", "a number in [0, 1]")
        for key in ("delta", "margin", "momentum", "weight_decay", "random_erasing"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise bad(key, "a finite number >= 0")
        if self.random_erasing > 1:
            raise bad("random_erasing", "a probability in [0, 1]")
        for key in ("lr", "base_lr"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise bad(key, "a finite number > 0")
        for key in ("embed_dim", "depth", "win_size", "n_test", "batch_size", "workers",
                    "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        for key in ("steps", "base_steps", "num_workers", "eval_workers", "n_samples", "eval_every"):
            if getattr(self, key) < 0:
                raise bad(key, "an integer >= 0")
        if self.output_ch not in (3, 6):
            raise bad("output_ch", "3 (deflared image) or 6 (deflared image + flare)")
        if self.data_loader is not None and self.data_loader not in DATA_LOADERS:
            raise bad("data_loader", "one of " + ", ".join(DATA_LOADERS) + " or null (by layout)")
        if self.base_kind is not None and self.base_kind not in BASE_KINDS:
            raise bad("base_kind", "one of " + ", ".join(BASE_KINDS) + " (or null without a checkpoint)")
        if self.checkpoint is not None and self.base_kind is None:
            raise UserError(f"{where}: checkpoint={self.checkpoint!r} needs base_kind: flare7k (the "
                            "Flare7K v1 release) or flare7kpp (Flare7K++); both have 6 output "
                            "channels, so the file cannot tell")
        if self.checkpoint is None and self.base_kind not in (None, PROCEDURAL_BASE_KIND):
            raise UserError(f"{where}: base_kind={self.base_kind!r} needs a checkpoint; the "
                            "procedural base keeps the light source in its ground truth and is "
                            f"evaluated as {PROCEDURAL_BASE_KIND} (leave base_kind null)")
        if self.crop < 16 or self.test_size < 16 or self.eval_size < 16:
            key = "crop" if self.crop < 16 else "test_size" if self.test_size < 16 else "eval_size"
            raise bad(key, "an image side >= 16")
        if (self.eval_mode in ("center-crop", "tiles") and self.data is None and self.test_data is None
                and self.eval_size > self.test_size):
            raise UserError(f"{where}: eval_mode={self.eval_mode} cuts eval_size={self.eval_size} px "
                            f"views from the procedural test images of test_size={self.test_size} "
                            "px; use a resize mode or an eval_size <= test_size")
        if self.data is not None and self.backgrounds is None:
            raise UserError(f"{where}: data={self.data!r} needs backgrounds (a Flickr24K-style folder)")
        if self.workers > 1 and self.backend == "none":
            raise UserError(f"{where}: workers={self.workers} needs backend: ddp or horovod")
        if self.batch_size % self.workers:
            raise UserError(f"{where}: batch_size={self.batch_size} must be divisible by "
                            f"workers={self.workers} (each worker gets an equal share of the batch)")
        if self.encoder_weights is not None and not self.encoder_pretrained:
            raise UserError(f"{where}: encoder_weights={self.encoder_weights!r} needs "
                            "encoder_pretrained: true (the file holds pretrained weights)")
        # A name, or timm:<model>. Whether timm has that model needs timm (and torch): the callers
        # that may import them check it (cascade.encoders.check_encoder_name: orchestrator.space
        # for every cell before Ray starts, cascade.train before a trial writes anything); this
        # module stays torch-free and below cascade.encoders.
        if self.encoder not in ENCODER_NAMES and not (
                self.encoder.startswith(TIMM_PREFIX) and len(self.encoder) > len(TIMM_PREFIX)):
            raise UserError(f"{where}: unknown encoder {self.encoder!r}; expected one of "
                            f"{', '.join(ENCODER_NAMES)}, or {TIMM_PREFIX}<model> for any timm "
                            "model (e.g. timm:resnet50)")
        if self.fail_at_step is not None and self.fail_at_step < 0:
            raise bad("fail_at_step", "a step >= 0 or null")


# -- field classes -----------------------------------------------------------------------------------

# How a trial runs, not what it computes: left out of the trial id, so e.g. a new checkpoint
# interval resumes the same trial instead of starting a new one.
# The stream cache's settings too: it changes where the frozen half of a step comes from, never
# its bits (its key, cascade.stream_cache.stream_spec, covers everything those depend on).
RUNTIME_FIELDS = ("num_workers", "eval_workers", "checkpoint_every", "log_every", "base_cache",
                  "eval_every", "stream_cache", "stream_cache_dir")
# A trial's identity (`cfg.digest(ID_FIELDS)` is its id's hash): every other field, sorted.
ID_FIELDS = tuple(sorted(f.name for f in fields(TrialConfig) if f.name not in RUNTIME_FIELDS))
# May differ between a checkpoint and the run resuming it: the runtime fields, plus what changes
# how the run is executed but not what it computes (on the CPU; a device change breaks
# bit-identity but is still the same experiment, e.g. a retry on a node with another GPU count).
RESUME_MAY_CHANGE = RUNTIME_FIELDS + ("fail_at_step", "n_samples", "workers", "backend", "device",
                                      "compile")
# ... and, resuming a checkpoint to evaluate it again (a new protocol or test set: no training step),
# the evaluation fields and the paths: the files behind paths are identified by their contents
# (orchestrator.identity), so a moved mount resumes, a changed file is a new trial.
# Hold paths: made absolute before a trial starts, because trials run in other directories.
PATH_FIELDS = ("checkpoint", "data", "backgrounds", "test_data", "base_cache", "encoder_weights",
               "lpips_weights", "stream_cache_dir")
# Determine the procedural base network's weights (its cache key, cascade.pretrain).
BASE_FIELDS = ("embed_dim", "depth", "win_size", "output_ch", "base_steps", "base_lr", "crop",
               "batch_size")
# Determine the procedural test set's images (its cache key, cascade.data.testset).
TEST_FIELDS = ("n_test", "test_size")
# Change how trained weights are scored, never the weights themselves. A trial's training
# identity leaves them out and its evaluation identity adds them (orchestrator.identity), so a new
# protocol re-evaluates saved weights instead of retraining. Which test set: test_data (a path:
# identified by its files' contents), n_test (the procedural one's size). How it is scored:
# protocol, ssim_window, lpips (the convention), lpips_weights (a path: identified by the
# weights' contents; metrics.json records their fingerprint). How a test image becomes a
# prediction: eval_mode, and base_kind, which selects only the official output path (training
# takes channels 0:3 whatever the kind, and the training pairs follow the data's own layout,
# cascade.data.flare7k, recorded as metrics.json's data_loader). n_samples: which predictions are
# saved as PNGs. Not here: test_size, although a TEST_FIELD: the procedural base is trained on
# frames of the test resolution (cascade.pretrain.base_frame), so it changes the base's weights;
# kind, seed and every loss, data, optimiser and base-network field (they change the weights);
# eval_workers and eval_every are RUNTIME_FIELDS (they change neither). tests/test_config.py
# checks that no field here changes the procedural base's cache key.
EVAL_FIELDS = ("protocol", "ssim_window", "test_data", "n_test", "eval_mode", "eval_size", "lpips",
               "lpips_weights", "base_kind", "n_samples")
RESUME_MAY_CHANGE = tuple(dict.fromkeys(RESUME_MAY_CHANGE + EVAL_FIELDS + PATH_FIELDS))


def real_test_dir(cfg: TrialConfig) -> str | None:
    """The real test folder a config evaluates on: `test_data`, else `<data>/test_data/real`;
    None: the procedural test set. UserError when `data` has no such folder (the one rule for
    orchestrator.identity, which fingerprints it, and cascade.data.testset, which reads it)."""
    if cfg.test_data:
        return cfg.test_data
    if cfg.data:
        real = Path(cfg.data).expanduser() / "test_data" / "real"
        if not real.is_dir():
            raise UserError(f"data={cfg.data!r} has no test_data/real folder; set test_data to the "
                            "folder with input/ gt/ mask/ to evaluate on")
        return str(real)
    return None


def inert_fields(cfg: TrialConfig) -> frozenset[str]:
    """Fields whose value cannot change this config's results given its other fields: left out of
    its identities (orchestrator.identity), so a field added with such a default keeps every
    existing id. `data_loader` without data or when null (by layout: what every trial did before
    the field existed); `random_erasing_on` without erasing; `eval_size` outside VIEW_MODES."""
    inert = set()
    if cfg.data is None or cfg.data_loader is None:  # null: by layout, as before the field existed
        inert.add("data_loader")
    if cfg.random_erasing == 0:
        inert.add("random_erasing_on")
    if cfg.eval_mode not in VIEW_MODES:
        inert.add("eval_size")
    return frozenset(inert)


def check_base_kind(checkpoint: str | os.PathLike, base_kind: str | None, output_ch: int) -> None:
    """UserError naming the key and the file when `base_kind` contradicts the checkpoint's output
    channels (read from the file by the caller: this module stays torch-free). Flare7K++
    networks predict the deflared image and the flare (6 channels); a v1 network may have 6 (the
    release) or 3 (deflared image only)."""
    if base_kind == "flare7kpp" and output_ch != 6:
        raise UserError(f"{checkpoint}: base_kind=flare7kpp, but this Uformer has {output_ch} output "
                        "channels (no flare); a Flare7K++ network has 6: use base_kind: flare7k or "
                        "the Flare7K++ checkpoint")


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    """Accept YAML/JSON scalars for a field of type `hint`; reject anything else clearly."""
    allowed = get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"{where}: {name} must not be null")
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: {name}={value!r} is invalid; expected true or false")
    if int in allowed:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise UserError(f"{where}: {name}={value!r} is invalid; expected an integer")
        return int(value)
    if float in allowed:
        # A number written as a string: plain PyYAML (YAML 1.1) reads `1e-3` so (see FLOAT_LITERAL).
        if isinstance(value, str) and FLOAT_LITERAL.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name}={value!r} is invalid; expected a number")
        return float(value)
    if str in allowed:
        if not isinstance(value, str):
            raise UserError(f"{where}: {name}={value!r} is invalid; expected a string")
        return value
    raise TypeError(f"unsupported field type {hint!r} for {name}")  # a bug in TrialConfig itself


def _close_match(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
