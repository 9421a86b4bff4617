"""The Optuna study of a sampled search, kept in the sweep folder so that a resumed search continues
it instead of starting over (issue 19).

    results/<sweep>/optuna.journal     Optuna's JournalStorage: every trial, its params, its
                                       intermediate values by `step`, its state and value

A journal file needs no database server, and its lock works on NFS (Optuna's file lock is a
symlink/O_EXCL file, not flock). `optuna-dashboard results/<sweep>/optuna.journal` shows it.

One study per objective and parameter space (`study_name`). What `open_study` does on each run:
- the study exists: trials a dead driver left RUNNING become FAIL (the journal has no heartbeat;
  the caller holds the sweep lock, so no live driver owns them);
- it does not: it is created, with the history that still fits it, from the most recent study of
  the same objective in the journal (the parameter space changed: samples outside the new bounds
  are dropped, and said so) or, for a sweep from before the journal, from the record's samples
  (`Sample`s the caller reads from the results folder). So sweep.json is a warm start once, never
  again (it would be added twice).

Ray-free and torch-free; optuna is imported inside the functions (`status` never pays for it).
The Ray side (sweep.py's searcher) reports intermediate values by `step`, marks trials the
scheduler stopped PRUNED and failed ones FAIL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.io import digest
from orchestrator.space import Param, Search

JOURNAL = "optuna.journal"
FINAL = ("COMPLETE", "PRUNED")  # trial states whose outcome a duplicate proposal can reuse


@dataclass(frozen=True)
class Sample:
    """One earlier search trial: its sampled values and how it ended.

    state: "COMPLETE" (value: its final metric), "PRUNED" (stopped early; `intermediate` holds
    the metric by step, value None) or "FAIL".
    """

    values: dict[str, Any]
    state: str
    value: float | None = None
    intermediate: dict[int, float] = field(default_factory=dict)
    trial_id: str | None = None  # the results folder's trial id, when known


@dataclass
class Study:
    """An opened study: where it lives and what opening it changed (lines for the console)."""

    storage: Any  # optuna.storages.BaseStorage
    name: str
    path: Path
    notes: list[str]
    enqueued: int = 0  # interrupted samples queued to run first (`enqueue`)


def journal_path(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / JOURNAL


def distributions(params: Sequence[Param]) -> dict[str, Any]:
    """Optuna distributions equal to what Ray's OptunaSearch makes of the space's tune domains
    (uniform, loguniform, randint with an exclusive high, choice)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in params:
        if p.distribution == "uniform":
            out[p.name] = FloatDistribution(p.args[0], p.args[1])
        elif p.distribution == "loguniform":
            out[p.name] = FloatDistribution(p.args[0], p.args[1], log=True)
        elif p.distribution == "randint":
            out[p.name] = IntDistribution(p.args[0], p.args[1] - 1)
        else:
            out[p.name] = CategoricalDistribution(list(p.args))
    return out


def study_name(search: Search) -> str:
    """`<metric>-<mode>-<hash of the parameter space>`: a new space is a new study."""
    space = [[p.name, p.distribution, list(p.args)] for p in search.params]
    return f"{search.metric}-{search.mode}-{digest(space, 8)}"


def fits(values: dict[str, Any], dists: dict[str, Any]) -> bool:
    """Whether sampled `values` lie in `dists` (same names, every value inside its distribution)."""
    if set(values) != set(dists):
        return False
    for name, dist in dists.items():
        try:
            if not dist._contains(dist.to_internal_repr(values[name])):
                return False
        except (ValueError, TypeError):  # e.g. a choice that is no longer offered
            return False
    return True


def open_storage(path: Path) -> Any:
    """A JournalStorage on `path` (Optuna >= 4: JournalFileBackend; 3.x: JournalFileStorage)."""
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend as Backend
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileStorage as Backend
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(Backend(str(path)))


def open_study(sweep_dir: str | Path, search: Search, history: Callable[[], list[Sample]],
               describe: Callable[[dict[str, Any]], str] = lambda v: _values_text(v)) -> Study:
    """Open (or create) the study of `search` in `sweep_dir`/optuna.journal; see the module doc.

    `history()` is called only when the study is new and the journal holds no study of the same
    objective: the record's earlier samples (a sweep from before the journal).
    """
    import optuna
    from optuna.trial import TrialState

    path = journal_path(sweep_dir)
    storage = open_storage(path)
    name, notes = study_name(search), []
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        for t in dead:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        finished = sum(t.state.name in FINAL for t in study.get_trials(deepcopy=False))
        notes.append(f"search: continuing study {name} ({finished} finished trial(s)) in {path}"
                     + (f"; {len(dead)} a stopped run left running marked failed" if dead else ""))
        return Study(storage, name, path, notes)

    study = optuna.create_study(storage=storage, study_name=name,
                                direction="maximize" if search.mode == "max" else "minimize")
    study.set_user_attr("metric", search.metric)
    study.set_user_attr("mode", search.mode)
    study.set_user_attr("params", {p.name: {p.distribution: list(p.args)} for p in search.params})
    dists = distributions(search.params)
    previous = _latest_same_objective(storage, search, exclude=name)
    if previous is not None:
        earlier, source = [_sample_of(t) for t in previous.get_trials(deepcopy=False)
                           if t.state.name in FINAL], f"study {previous.study_name}"
    else:
        earlier, source = [s for s in history() if s.state in FINAL], "sweep.json"
    kept = [s for s in earlier if fits(s.values, dists)]
    dropped = [s for s in earlier if not fits(s.values, dists)]
    for s in kept:
        study.add_trial(optuna.trial.create_trial(
            state=getattr(TrialState, s.state), value=s.value if s.state == "COMPLETE" else None,
            params=s.values, distributions=dists, intermediate_values=s.intermediate or None,
            user_attrs={"trial_id": s.trial_id} if s.trial_id else None))
    if earlier and previous is not None:
        notes.append(f"search: the parameter space changed; new study {name} keeps {len(kept)} of "
                     f"{len(earlier)} samples of {source}"
                     + (f", dropped {len(dropped)} outside it: "
                        + "; ".join(describe(s.values) for s in dropped[:5])
                        + (" ..." if len(dropped) > 5 else "") if dropped else ""))
    elif earlier:
        notes.append(f"search: study {name} created in {path} with the {len(kept)} finished "
                     f"sample(s) of {source}" + (f" ({len(dropped)} outside the space dropped: "
                                                 + "; ".join(describe(s.values) for s in dropped[:5])
                                                 + ")" if dropped else ""))
    else:
        notes.append(f"search: study {name} created in {path}")
    return Study(storage, name, path, notes)


def enqueue(study: Study, samples: Iterable[dict[str, Any]]) -> int:
    """Queue samples that a stopped run interrupted, so the search runs them first (under the
    scheduler, told to the sampler) instead of drawing new ones; samples already queued are not
    queued twice. Returns how many are queued now."""
    import optuna
    from optuna.trial import TrialState

    loaded = optuna.load_study(study_name=study.name, storage=study.storage)
    waiting = [t.params or t.system_attrs.get("fixed_params", {})
               for t in loaded.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    count = len(waiting)
    for values in samples:
        if values not in waiting:
            loaded.enqueue_trial(values)
            waiting.append(values)
            count += 1
    study.enqueued = count
    return count


def outcomes(study: Study) -> list[Sample]:
    """The finished (COMPLETE / PRUNED) trials of the study, as Samples."""
    import optuna

    loaded = optuna.load_study(study_name=study.name, storage=study.storage)
    return [_sample_of(t) for t in loaded.get_trials(deepcopy=False) if t.state.name in FINAL]


def _latest_same_objective(storage: Any, search: Search, exclude: str) -> Any:
    """The most recently started other study of the same metric and mode, or None."""
    import optuna

    best, started = None, -1.0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if summary.study_name == exclude or attrs.get("metric") != search.metric \
                or attrs.get("mode") != search.mode:
            continue
        when = summary.datetime_start.timestamp() if summary.datetime_start else 0.0
        if when >= started:
            best, started = summary.study_name, when
    return None if best is None else optuna.load_study(study_name=best, storage=storage)


def _sample_of(trial: Any) -> Sample:
    return Sample(values=dict(trial.params), state=trial.state.name,
                  value=trial.value if trial.state.name == "COMPLETE" else None,
                  intermediate=dict(trial.intermediate_values),
                  trial_id=trial.user_attrs.get("trial_id"))


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
