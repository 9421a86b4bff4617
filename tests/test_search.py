"""orchestrator.search: the Optuna study in the sweep folder survives a resume (issue 19).

Optuna runs for real on a journal file in tmp_path; no Ray trials (tests/test_sweep.py runs the
search end to end).
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.search import (
    JOURNAL,
    Sample,
    distributions,
    enqueue,
    fits,
    open_study,
    outcomes,
    study_name,
)
from orchestrator.space import Param, Search

PARAMS = (Param("lambda_", "uniform", (0.0, 1.0)), Param("margin", "loguniform", (0.01, 1.0)),
          Param("k", "choice", (1, 2)), Param("steps", "randint", (2, 9)))


def _search(*params: Param, metric: str = "psnr_entire", mode: str = "max") -> Search:
    return Search(algorithm="optuna", metric=metric, mode=mode, num_samples=4, seed=0,
                  params=params or (PARAMS[0],), asha=None)


def _load(study) -> optuna.Study:
    return optuna.load_study(study_name=study.name, storage=study.storage)


def test_distributions_equal_what_rays_optuna_search_makes_of_the_tune_space():
    tune = pytest.importorskip("ray.tune")
    from ray.tune.search.optuna import OptunaSearch

    domains = {"lambda_": tune.uniform(0.0, 1.0), "margin": tune.loguniform(0.01, 1.0),
               "k": tune.choice([1, 2]), "steps": tune.randint(2, 9)}  # sweep.py's _search_setup
    assert OptunaSearch.convert_search_space(domains) == distributions(PARAMS)


def test_fits_checks_names_and_bounds():
    dists = distributions(PARAMS)
    point = {"lambda_": 0.5, "margin": 0.1, "k": 2, "steps": 8}
    assert fits(point, dists)
    assert not fits({**point, "lambda_": 1.5}, dists)
    assert not fits({**point, "k": 3}, dists)  # a choice no longer offered
    assert not fits({**point, "steps": 9}, dists)  # randint's high is exclusive
    assert not fits({"lambda_": 0.5}, dists)  # other parameter names


def test_a_new_study_takes_the_records_history_once(tmp_path):
    history = [Sample({"lambda_": 0.2}, "COMPLETE", 21.5, trial_id="a"),
               Sample({"lambda_": 0.7}, "PRUNED", None, {2: 19.0}, trial_id="b"),
               Sample({"lambda_": 0.9}, "FAIL")]
    calls = []

    def from_record() -> list[Sample]:
        calls.append(1)
        return history

    study = open_study(tmp_path, _search(), from_record)
    assert (tmp_path / JOURNAL).is_file() and study.name == study_name(_search())
    trials = _load(study).get_trials()
    assert [(t.state, t.value, t.intermediate_values, t.user_attrs) for t in trials] == [
        (TrialState.COMPLETE, 21.5, {}, {"trial_id": "a"}),
        (TrialState.PRUNED, None, {2: 19.0}, {"trial_id": "b"})]
    assert "with the 2 finished sample(s) of sweep.json" in study.notes[0]
    again = open_study(tmp_path, _search(), from_record)  # a resume: no second warm start
    assert len(_load(again).get_trials()) == 2 and calls == [1]
    assert again.notes[0].startswith(f"search: continuing study {study.name} (2 finished")


def test_trials_a_dead_driver_left_running_are_failed_on_resume(tmp_path):
    study = open_study(tmp_path, _search(), list)
    loaded = _load(study)
    dists = distributions((PARAMS[0],))
    done = loaded.ask(dists)
    loaded.tell(done, 20.0)
    loaded.ask(dists)  # the driver died while this trial ran
    again = open_study(tmp_path, _search(), list)
    assert [t.state for t in _load(again).get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "1 a stopped run left running marked failed" in again.notes[0]


def test_narrowed_bounds_keep_the_history_that_fits_and_say_what_was_dropped(tmp_path):
    wide = _search(Param("lambda_", "uniform", (0.0, 1.0)))
    study = open_study(tmp_path, wide, list)
    loaded = _load(study)
    for value, result in ((0.2, 20.0), (0.9, 22.0), (0.45, 21.0)):
        loaded.enqueue_trial({"lambda_": value})
        loaded.tell(loaded.ask(distributions(wide.params)), result)
    narrow = _search(Param("lambda_", "uniform", (0.0, 0.5)))
    moved = open_study(tmp_path, narrow, list)
    assert moved.name != study.name
    kept = outcomes(moved)
    assert sorted(s.values["lambda_"] for s in kept) == [0.2, 0.45]
    assert [s.value for s in sorted(kept, key=lambda s: s.values["lambda_"])] == [20.0, 21.0]
    assert moved.notes[0] == (f"search: the parameter space changed; new study {moved.name} keeps "
                              f"2 of 3 samples of study {study.name}, dropped 1 outside it: "
                              "lambda_=0.9")
    # Another objective is another history: nothing carries over.
    other = open_study(tmp_path, _search(Param("lambda_", "uniform", (0.0, 0.5)), metric="psnr_glare"),
                       list)
    assert outcomes(other) == []


def test_interrupted_samples_are_queued_once(tmp_path):
    study = open_study(tmp_path, _search(), list)
    assert enqueue(study, [{"lambda_": 0.3}]) == 1
    assert enqueue(study, [{"lambda_": 0.3}]) == 1  # a second resume does not queue it twice
    loaded = _load(study)
    trial = loaded.ask({"lambda_": optuna.distributions.FloatDistribution(0.0, 1.0)})
    assert trial.params == {"lambda_": 0.3}  # asked first


def test_importing_it_costs_neither_optuna_nor_torch_nor_ray():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, orchestrator.search; "
            "print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
