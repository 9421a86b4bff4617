"""Search spaces (search_spaces/*.yaml) -> a validated plan of cells with stable trial ids.

A search space is data, one file per experiment, with a comment at the top saying what question it
answers. Its keys (anything else is an error naming the file and the key):

    name: demo                    # results/<name>/; letters, digits, '-', '_', '.'
    grid: {k: [1, 2], lambda_: [1.0, 0.5, 0.0]}   # TrialConfig fields -> non-empty value lists
    fixed: {steps: 200, ...}      # TrialConfig fields shared by every trial
    reference: true               # also evaluate the base network alone (one cell per seed)
    control: true                 # also evaluate the cascade at 0 steps (default: as reference)
    seeds: [0]                    # repeats of every cell
    requires: [data, checkpoint]  # fields the user must give (on the command line) to run it
    resources: {cpu: 1, gpu: 0.5} # per trial; fractional GPUs let small trials share a device
    max_concurrent: 2             # trials at a time (null: as many as resources allow)
    max_failures: 1               # Ray retries of a crashed trial within one run
    search:                       # instead of `grid`: a sampled search (Optuna TPE + ASHA)
      algorithm: optuna
      metric: psnr_entire         # a key of cascade.metrics.summary_keys(protocol)
      mode: max
      num_samples: 8
      seed: 0                     # sampler seed (optional)
      params: {lambda_: {uniform: [0, 1]}, margin: {loguniform: [0.01, 1.0]}}
                                  # also {randint: [low, high)} and {choice: [a, b, ...]}
      scheduler: {asha: {grace_period: 2, reduction_factor: 2}}   # optional

Every cell is validated through `TrialConfig.from_dict` here, so a bad value fails before any Ray
process starts. A cell's trial id is a function of its resolved config (readable prefix + hash of
the fields that change its results): `k2-l0.6-s0-1a2b3c4d`, `ref-s0-...`, `ctl-s0-...` (the
control: the cascade at 0 steps, the base applied to its own output). With lambda_ = 0 the
L_REG term vanishes, so k is irrelevant: both k cells run one trial (k set to `LAMBDA0_K`) and the
plan files it under both rows.

Pure Python, no torch, no Ray: sweep.py turns a `SweepSpace` into Ray Tune calls.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cascade.config import PATH_FIELDS, TIMM_PREFIX, TrialConfig
from cascade.errors import UserError
from cascade.fmt import is_number
from cascade.io import parse_yaml
from orchestrator import identity, preflight

TOP_KEYS = ("name", "grid", "fixed", "reference", "control", "seeds", "requires", "resources",
            "max_concurrent", "max_failures", "search")
SEARCH_KEYS = ("algorithm", "metric", "mode", "num_samples", "seed", "params", "scheduler")
RESOURCE_KEYS = ("cpu", "gpu")
SEARCH_ALGORITHMS = ("optuna",)
MODES = ("max", "min")
# Distribution name -> what its argument list must look like (checked in `_param`).
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# ASHA settings a space may set; the time attribute is the trial's reported `step`.
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t")
SCHEDULERS = ("asha",)
# Command-line flags that fill `requires` fields, for the error message.
REQUIRE_FLAGS = {"data": "--data DIR", "checkpoint": "--checkpoint PATH",
                 "backgrounds": "--backgrounds DIR", "test_data": "--test-data DIR"}
LAMBDA0_K = 1  # the k a lambda_ = 0 trial is run with (any k gives the same loss)
# Trial-id prefixes of the evaluation-only kinds (cascade.config.EVAL_ONLY_KINDS).
EVAL_ONLY_PREFIX = {"reference": "ref", "control": "ctl"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Resources:
    """Ray resources of one trial."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class Param:
    """One sampled TrialConfig field: `distribution` in DISTRIBUTIONS with its `args`."""

    name: str
    distribution: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Search:
    """A sampled search over `params` (Optuna TPE), optionally early-stopped by ASHA."""

    algorithm: str
    metric: str
    mode: str
    num_samples: int
    seed: int | None
    params: tuple[Param, ...]
    asha: dict[str, int] | None  # ASHA_KEYS -> value; None: no early stopping


@dataclass(frozen=True)
class Cell:
    """One row of the plan. Cells with equal `trial_id` share one trial (the lambda_ = 0 pair).

    `trial_id` is the training identity (the trial's folder), `eval_id` the evaluation identity
    (orchestrator.identity); `fingerprints` the content fingerprints both were computed from.
    """

    trial_id: str
    kind: str  # "cascade", "reference" or "control" (cascade.config.KINDS)
    k: int | None  # the grid's k (None for reference and control); config.k may be LAMBDA0_K
    lambda_: float | None
    seed: int
    config: TrialConfig
    eval_id: str = ""
    fingerprints: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The cell as `sweep.json` stores it (docs/design.md, "Results on disk")."""
        return {"trial_id": self.trial_id, "eval_id": self.eval_id, "kind": self.kind, "k": self.k,
                "lambda_": self.lambda_, "seed": self.seed, "config": self.config.to_dict(),
                "fingerprints": self.fingerprints}


@dataclass(frozen=True)
class SweepSpace:
    """A validated search space. `cells` is the grid plan (search trials are added as sampled)."""

    path: Path
    name: str
    question: str  # the file's top comment
    fixed: dict[str, Any]
    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    resources: Resources
    max_concurrent: int | None
    max_failures: int
    search: Search | None
    # The content fingerprints every search sample shares (its files are fixed fields), computed
    # once when the space is loaded; None without a search.
    search_fingerprints: dict[str, Any] | None = field(default=None, compare=False)

    def trials(self) -> list[Cell]:
        """One cell per distinct trial id, in plan order."""
        return distinct_trials(self.cells)

    def search_config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The TrialConfig of a search trial: fixed fields, the first seed, the sampled values."""
        return TrialConfig.from_dict({**self.fixed, "seed": self.seeds[0], **sampled},
                                     where=f"{self.path}: sampled trial")

    def search_probe(self) -> TrialConfig | None:
        """A search trial's config at each parameter's first bound (None without a search): what
        the driver validates and prepares for, since every sample shares its other fields."""
        if self.search is None:
            return None
        return self.search_config({p.name: p.args[0] for p in self.search.params})


def distinct_trials(cells: Iterable[Cell]) -> list[Cell]:
    """One cell per distinct trial id, in order (the two lambda_ = 0 cells share one trial)."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        seen.setdefault(cell.trial_id, cell)
    return list(seen.values())


def trial_id(cfg: TrialConfig, inputs: dict[str, Any] | None = None) -> str:
    """Stable, readable id of a trial's training: `k2-l0.6-s0-<hash>` / `ref-s0-<hash>` /
    `ctl-s0-<hash>`.

    The hash is the training identity (orchestrator.identity.training_key): the fields that change
    the trained weights plus the content fingerprints of its input files, never their paths.
    """
    inputs = identity.training_inputs(cfg) if inputs is None else inputs
    prefix = (f"{EVAL_ONLY_PREFIX[cfg.kind]}-s{cfg.seed}" if cfg.kind in EVAL_ONLY_PREFIX
              else f"k{cfg.k}-l{cfg.lambda_:.3g}-s{cfg.seed}")
    return f"{prefix}-{identity.training_key(cfg, inputs)[:8]}"


def eval_id(cfg: TrialConfig, train_id: str, inputs: dict[str, Any] | None = None) -> str:
    """Readable id of an evaluation of a trial: `<protocol>-<hash>` (identity.evaluation_key)."""
    inputs = identity.evaluation_inputs(cfg) if inputs is None else inputs
    return f"{cfg.protocol}-{identity.evaluation_key(train_id, cfg, inputs)[:8]}"


def cell_for(cfg: TrialConfig, k: int | None = None,
             fingerprints: dict[str, Any] | None = None) -> Cell:
    """The plan cell of a config (the grid's `k` may differ from cfg.k for lambda_ = 0).

    `fingerprints` ({"training": ..., "evaluation": ...}): the ones the plan was made with (a trial
    process rebuilding its cell); None: computed from the files now.
    """
    if cfg.kind == "cascade" and cfg.lambda_ == 0.0 and cfg.k != LAMBDA0_K:
        cfg = cfg.replace(k=LAMBDA0_K)
    if fingerprints is None:
        fingerprints = {"training": identity.training_inputs(cfg),
                        "evaluation": identity.evaluation_inputs(cfg)}
    training, evaluation = fingerprints["training"], fingerprints["evaluation"]
    tid = trial_id(cfg, training)
    prints = {"training": training, "evaluation": evaluation}
    if cfg.kind in EVAL_ONLY_PREFIX:
        return Cell(tid, cfg.kind, None, None, cfg.seed, cfg, eval_id(cfg, tid, evaluation), prints)
    return Cell(tid, "cascade", cfg.k if k is None else k, cfg.lambda_, cfg.seed, cfg,
                eval_id(cfg, tid, evaluation), prints)


# -- loading ---------------------------------------------------------------------------------


def load_space(
    path: str | Path,
    *,
    data: str | None = None,
    backgrounds: str | None = None,
    test_data: str | None = None,
    checkpoint: str | None = None,
    seeds: int | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    protocol: str | None = None,
    base_kind: str | None = None,
    eval_mode: str | None = None,
    eval_size: int | None = None,
) -> SweepSpace:
    """Read, validate and expand a search space; the keyword arguments are command-line overrides.

    `seeds=N` replaces the file's seeds by 0..N-1; `protocol`, `eval_mode` and `eval_size` the
    evaluation (a new evaluation of the same trials, no retraining). Raises UserError (one line, naming the file and
    key) on anything the orchestrator would not understand.
    """
    path = Path(path)
    raw, question = _read_yaml(path)
    where = str(path)
    _check_keys(raw, TOP_KEYS, where)
    name = _name(raw, where)
    if "seeds" not in raw:
        raise UserError(f"{where}: missing key 'seeds'")

    fixed = _mapping(raw.get("fixed", {}), f"{where}: fixed")
    for key in ("kind", "seed"):
        if key in fixed:
            raise UserError(f"{where}: fixed.{key} is set by the sweep (use `reference`, "
                            "`control` / `seeds`)")
    cli = {"data": data, "backgrounds": backgrounds, "test_data": test_data, "checkpoint": checkpoint,
           "protocol": protocol, "base_kind": base_kind, "eval_mode": eval_mode,
           "eval_size": eval_size}
    fixed.update({key: value for key, value in cli.items() if value is not None})
    for key in PATH_FIELDS:
        if isinstance(fixed.get(key), str):
            fixed[key] = str(Path(fixed[key]).expanduser().resolve())
            if key != "base_cache" and not Path(fixed[key]).exists():
                raise UserError(f"{where}: {key}={fixed[key]}: no such file or folder")
    if fixed.get("data") and not fixed.get("backgrounds"):
        fixed["backgrounds"] = _find_backgrounds(Path(fixed["data"]), where)
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise UserError(f"{where}: requires must be a list of config keys")
    _check_keys(dict.fromkeys(requires), tuple(REQUIRE_FLAGS), f"{where}: requires")
    missing = [r for r in requires if fixed.get(r) is None]
    if missing:
        flags = " and ".join(REQUIRE_FLAGS[r] for r in missing)
        raise UserError(f"{where} needs {flags} (the command with every input is at the top of "
                        "the file; README: \"Running the real experiment\")")
    # Unknown keys and bad values, before any expansion (after `requires`: a missing input is the
    # first thing to say, not what a field set for that input says without it).
    TrialConfig.from_dict(fixed, where=f"{where}: fixed")

    seed_list = _seeds(raw["seeds"], where) if seeds is None else _seed_count(seeds)
    resources = _resources(raw.get("resources", {}), where)
    if gpus_per_trial is not None:
        resources = Resources(cpu=resources.cpu, gpu=float(gpus_per_trial))
        _check_gpu(resources.gpu, "--gpus-per-trial")
        # N >= 2 GPUs per trial: one data-parallel rank per GPU, unless the space sets workers.
        search_params = _mapping(_mapping(raw.get("search"), f"{where}: search").get("params"),
                                 f"{where}: search.params")
        open_keys = set(fixed) | set(_mapping(raw.get("grid"), f"{where}: grid")) | set(search_params)
        fixed.update(preflight.workers_for_gpus(gpus_per_trial, open_keys))
    concurrent = raw.get("max_concurrent") if max_concurrent is None else max_concurrent
    if concurrent is not None and not _is_int(concurrent, minimum=1):
        raise UserError(f"{where}: max_concurrent={concurrent!r} is invalid; expected an integer >= 1")
    max_failures = raw.get("max_failures", 0)
    if not _is_int(max_failures, minimum=0):
        raise UserError(f"{where}: max_failures={max_failures!r} is invalid; expected an integer >= 0")

    reference = raw.get("reference", False)
    if not isinstance(reference, bool):
        raise UserError(f"{where}: reference={reference!r} is invalid; expected true or false")
    control = raw.get("control", reference)  # the control is read against the reference
    if not isinstance(control, bool):
        raise UserError(f"{where}: control={control!r} is invalid; expected true or false")
    search = None
    if "search" in raw:
        if "grid" in raw:
            raise UserError(f"{where}: give either grid or search, not both "
                            "(constant fields of a search go in fixed)")
        if len(seed_list) != 1:
            raise UserError(f"{where}: a search runs one seed; got seeds={list(seed_list)}")
        search = _search(raw["search"], fixed, where)
        grid: dict[str, list[Any]] = {}
    elif "grid" in raw:
        grid = _grid(raw["grid"], fixed, where)
    else:
        raise UserError(f"{where}: missing key 'grid' (or 'search')")

    cells: list[Cell] = []
    for seed in seed_list:
        for kind in [k for k, on in (("reference", reference), ("control", control)) if on]:
            cfg = TrialConfig.from_dict({**fixed, "kind": kind, "seed": seed},
                                        where=f"{where}: {kind} cell")
            cells.append(cell_for(cfg))
        for values in itertools.product(*grid.values()) if grid else ():
            point = dict(zip(grid, values))
            label = ", ".join(f"{k}={v!r}" for k, v in point.items())
            cfg = TrialConfig.from_dict({**fixed, **point, "seed": seed},
                                        where=f"{where}: cell {label}, seed={seed}")
            cells.append(cell_for(cfg, k=cfg.k))
    for cell in cells:
        _check_device(cell.config, resources, where)
    _check_timm_encoders([c.config for c in cells] + ([TrialConfig.from_dict(
        {**fixed, "seed": seed_list[0]}, where=f"{where}: fixed")] if search else []), where)
    space = SweepSpace(path=path, name=name, question=question, fixed=fixed, cells=tuple(cells),
                       seeds=seed_list, resources=resources, max_concurrent=concurrent,
                       max_failures=max_failures, search=search)
    if search is not None:
        probe = cell_for(space.search_probe())
        space = dataclasses.replace(space, search_fingerprints=probe.fingerprints)
    return space


def _check_timm_encoders(configs: list[TrialConfig], where: str) -> None:
    """UserError naming the file unless timm has each `timm:<model>` encoder (imports timm only
    for such names; TrialConfig itself checks names without torch)."""
    for name in dict.fromkeys(c.encoder for c in configs if c.encoder.startswith(TIMM_PREFIX)):
        from cascade.encoders import check_encoder_name  # torch + timm, built nothing

        try:
            check_encoder_name(name)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None


def _find_backgrounds(data: Path, where: str) -> str:
    """A Flickr24K folder inside or beside the Flare7K++ root (the reference layout)."""
    candidates = (data / "Flickr24K", data.parent / "Flickr24K")
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    raise UserError(f"{where}: data={data} needs backgrounds (flare-free images, e.g. Flickr24K): "
                    f"pass --backgrounds DIR; none at {candidates[0]} or {candidates[1]}")


def space_name(path: str | Path) -> str:
    """The sweep name of a space file (its results folder), without expanding the space."""
    raw, _ = _read_yaml(Path(path))
    return _name(raw, str(path))


def _name(raw: dict[str, Any], where: str) -> str:
    if "name" not in raw:
        raise UserError(f"{where}: missing key 'name'")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"{where}: name={name!r} is invalid; expected a folder name "
                        "(letters, digits, '-', '_', '.')")
    return name


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """(mapping, top comment) of a space file; UserError when missing, unparsable or uncommented."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read search space ({exc.strerror or exc})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{line} invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of search-space keys")
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    question = " ".join(c for c in comment if c)
    if not question:
        raise UserError(f"{path}: start the file with a comment saying what question it answers")
    return raw, question


def _check_keys(mapping: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [key for key in mapping if key not in known]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(known)}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_is_int(s, 0) for s in value):
        raise UserError(f"{where}: seeds={value!r} is invalid; expected a non-empty list of integers >= 0")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: seeds={value!r} repeats a seed")
    return tuple(value)


def _seed_count(n: int) -> tuple[int, ...]:
    if not _is_int(n, 1):
        raise UserError(f"--seeds {n!r} is invalid; expected an integer >= 1")
    return tuple(range(n))


def _check_gpu(gpu: Any, where: str) -> None:
    ok = is_number(gpu, finite=True) and gpu >= 0
    if not ok or (gpu > 1 and gpu != int(gpu)):
        raise UserError(f"{where}={gpu!r} is invalid; expected a fraction in [0, 1] or a whole number of GPUs")


def _resources(value: Any, where: str) -> Resources:
    raw = _mapping(value, f"{where}: resources")
    _check_keys(raw, RESOURCE_KEYS, f"{where}: resources")
    cpu = raw.get("cpu", 1)
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not cpu > 0:
        raise UserError(f"{where}: resources.cpu={cpu!r} is invalid; expected a number > 0")
    gpu = raw.get("gpu", 0)
    _check_gpu(gpu, f"{where}: resources.gpu")
    return Resources(cpu=float(cpu), gpu=float(gpu))


def _check_device(cfg: TrialConfig, resources: Resources, where: str) -> None:
    """A trial pinned to CUDA needs a GPU from Ray; one pinned to the CPU must not hold one."""
    if cfg.device == "cuda" and resources.gpu == 0:
        raise UserError(f"{where}: device: cuda needs resources.gpu > 0 (or --gpus-per-trial)")
    if cfg.device == "cpu" and resources.gpu > 0:
        raise UserError(f"{where}: device: cpu would leave the trial's {resources.gpu:g} GPU idle; "
                        "set fixed.device to auto or cuda")
    preflight.check_placement(cfg, resources.gpu, where)  # ranks vs whole GPUs, before Ray starts


def _grid(value: Any, fixed: dict[str, Any], where: str) -> dict[str, list[Any]]:
    grid = _mapping(value, f"{where}: grid")
    if not grid:
        raise UserError(f"{where}: grid is empty; give at least one key with a list of values")
    known = {f.name for f in fields(TrialConfig)} - {"kind", "seed"}
    for key, values in grid.items():
        if key not in known:
            TrialConfig.from_dict({key: None}, where=f"{where}: grid")  # raises with a hint
            raise UserError(f"{where}: grid.{key} is set by the sweep (use `reference` / `seeds`)")
        if key in fixed:
            raise UserError(f"{where}: {key} is in both grid and fixed")
        if key in identity.eval_fields():
            raise UserError(f"{where}: grid.{key} is an evaluation setting: the evaluations of one "
                            "training run share its folder; set it in fixed (or `--protocol`), "
                            "and each value is evaluated from the same weights")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid.{key} is empty; expected a non-empty list of values")
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"{where}: grid.{key}={values!r} repeats a value")
    return grid


def _search(value: Any, fixed: dict[str, Any], where: str) -> Search:
    raw = _mapping(value, f"{where}: search")
    _check_keys(raw, SEARCH_KEYS, f"{where}: search")
    for key in ("algorithm", "metric", "mode", "num_samples", "params"):
        if key not in raw:
            raise UserError(f"{where}: search.{key} is missing")
    if raw["algorithm"] not in SEARCH_ALGORITHMS:
        raise UserError(f"{where}: search.algorithm={raw['algorithm']!r}; expected one of "
                        + ", ".join(SEARCH_ALGORITHMS))
    from cascade.metrics import summary_keys  # here: it pulls in scikit-image, `status` need not

    protocol = TrialConfig.from_dict(fixed).protocol
    if raw["metric"] not in summary_keys(protocol):
        raise UserError(f"{where}: search.metric={raw['metric']!r}; expected one of "
                        + ", ".join(summary_keys(protocol)))
    if raw["mode"] not in MODES:
        raise UserError(f"{where}: search.mode={raw['mode']!r}; expected max or min")
    if not _is_int(raw["num_samples"], 1):
        raise UserError(f"{where}: search.num_samples={raw['num_samples']!r}; expected an integer >= 1")
    seed = raw.get("seed")
    if seed is not None and not _is_int(seed, 0):
        raise UserError(f"{where}: search.seed={seed!r}; expected an integer >= 0")
    params_raw = _mapping(raw["params"], f"{where}: search.params")
    if not params_raw:
        raise UserError(f"{where}: search.params is empty; give at least one field to sample")
    params = tuple(_param(name, spec, fixed, f"{where}: search.params.{name}")
                   for name, spec in params_raw.items())
    asha = None
    scheduler = _mapping(raw.get("scheduler"), f"{where}: search.scheduler")
    _check_keys(scheduler, SCHEDULERS, f"{where}: search.scheduler")
    if "asha" in scheduler:
        asha = _mapping(scheduler["asha"], f"{where}: search.scheduler.asha")
        _check_keys(asha, ASHA_KEYS, f"{where}: search.scheduler.asha")
        for key, v in asha.items():
            if not _is_int(v, 2 if key == "reduction_factor" else 1):
                raise UserError(f"{where}: search.scheduler.asha.{key}={v!r}; expected a positive integer"
                                + (" >= 2" if key == "reduction_factor" else ""))
    return Search(algorithm=raw["algorithm"], metric=raw["metric"], mode=raw["mode"],
                  num_samples=raw["num_samples"], seed=seed, params=params, asha=asha)


def _param(name: str, spec: Any, fixed: dict[str, Any], where: str) -> Param:
    if name in fixed:
        raise UserError(f"{where}: {name} is also in fixed")
    if name in ("kind", "seed") or name in PATH_FIELDS or name in identity.eval_fields():
        raise UserError(f"{where}: {name} cannot be searched (a search samples training settings)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {dist!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {dist} needs a list of values")
    if dist != "choice":
        if len(args) != 2 or not all(is_number(a) for a in args):
            raise UserError(f"{where}: {dist} needs [low, high]")
        low, high = args
        if not low < high:
            raise UserError(f"{where}: {dist} [{low}, {high}] is empty; expected low < high")
        if dist == "loguniform" and low <= 0:
            raise UserError(f"{where}: loguniform needs low > 0")
        if dist == "randint" and not all(_is_int(a, -(2**62)) for a in args):
            raise UserError(f"{where}: randint needs integer bounds")
    # Every value the distribution can produce must be a valid config (ranges are convex, so the
    # end points suffice); e.g. lambda_: {uniform: [0, 1.5]} fails here, not in trial 7.
    # randint's high is exclusive, as in Ray Tune.
    for value in (args if dist != "randint" else (args[0], args[1] - 1)):
        TrialConfig.from_dict({**fixed, name: value}, where=where)
    return Param(name=name, distribution=dist, args=tuple(args))
