"""orchestrator.space: search-space schema, cell expansion, trial ids, λ=0 dedupe."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.config import TrialConfig
from cascade.errors import UserError
from orchestrator.space import LAMBDA0_K, load_space, space_name, trial_id

ROOT = Path(__file__).resolve().parents[1]

GRID = """\
# Which k and lambda_ are best? (a test space)
name: grid
grid:
  k: [1, 2]
  lambda_: [1.0, 0.5, 0.0]
fixed:
  steps: 10
reference: true
seeds: [0, 1]
resources: {cpu: 1, gpu: 0}
max_concurrent: 2
max_failures: 1
"""

SEARCH = """\
# Is there a better lambda_? (a test space)
name: search
fixed: {k: 2}
seeds: [0]
search:
  algorithm: optuna
  metric: psnr_entire
  mode: max
  num_samples: 4
  params:
    lambda_: {uniform: [0.0, 1.0]}
    margin: {loguniform: [0.01, 1.0]}
  scheduler:
    asha: {grace_period: 2}
"""


def _load(tmp_path: Path, text: str, **overrides):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, **overrides)


def _error(tmp_path: Path, text: str, **overrides) -> str:
    with pytest.raises(UserError) as info:
        _load(tmp_path, text, **overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- expansion and ids ---------------------------------------------------------------------------


def test_grid_expands_seeds_x_reference_and_cells_with_lambda0_shared(tmp_path):
    space = _load(tmp_path, GRID)
    assert space.name == "grid" and space.question == "Which k and lambda_ are best? (a test space)"
    # Per seed: the reference, the control (default: on with the reference), the 6 grid cells.
    assert len(space.cells) == 2 * (2 + 6)
    assert [(c.kind, c.k, c.lambda_, c.seed) for c in space.cells[:8]] == [
        ("reference", None, None, 0), ("control", None, None, 0), ("cascade", 1, 1.0, 0),
        ("cascade", 1, 0.5, 0), ("cascade", 1, 0.0, 0), ("cascade", 2, 1.0, 0),
        ("cascade", 2, 0.5, 0), ("cascade", 2, 0.0, 0)]
    zero = [c for c in space.cells if c.lambda_ == 0.0 and c.seed == 0]
    assert [c.k for c in zero] == [1, 2]
    assert zero[0].trial_id == zero[1].trial_id and zero[0].config.k == LAMBDA0_K
    assert len(space.trials()) == 2 * 7
    assert len({c.trial_id for c in space.cells}) == 14
    assert all(c.config.steps == 10 for c in space.cells)
    assert space.cells[0].to_json()["config"]["kind"] == "reference"
    control = space.cells[1]
    assert control.trial_id.startswith("ctl-s0-") and control.config.kind == "control"
    assert control.trial_id != space.cells[0].trial_id


def test_control_follows_the_reference_unless_set(tmp_path):
    kinds = [c.kind for c in _load(tmp_path, GRID.replace("reference: true", "reference: false")).cells]
    assert "control" not in kinds and "reference" not in kinds
    off = _load(tmp_path, GRID.replace("reference: true", "reference: true\ncontrol: false"))
    assert [c.kind for c in off.cells].count("control") == 0
    alone = _load(tmp_path, GRID.replace("reference: true", "reference: false\ncontrol: true"))
    assert [c.kind for c in alone.cells].count("control") == 2
    assert "control='yes' is invalid" in _error(
        tmp_path, GRID.replace("reference: true", "reference: true\ncontrol: 'yes'"))


def test_trial_id_is_stable_readable_and_ignores_runtime_only_fields():
    cfg = TrialConfig.from_dict({"k": 2, "lambda_": 0.6, "seed": 3})
    tid = trial_id(cfg)
    assert tid.startswith("k2-l0.6-s3-") and len(tid.rsplit("-", 1)[1]) == 8
    assert trial_id(TrialConfig.from_dict(cfg.to_dict())) == tid
    assert trial_id(cfg.replace(log_every=1, checkpoint_every=7, num_workers=0)) == tid
    assert trial_id(cfg.replace(steps=cfg.steps + 1)) != tid
    assert trial_id(cfg.replace(k=1)) != tid
    assert trial_id(cfg.replace(kind="reference")).startswith("ref-s3-")


def test_cli_overrides_seeds_gpus_concurrency_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "net.pth").touch()
    grid = GRID.replace("steps: 10", "steps: 10\n  device: auto\n  base_kind: flare7kpp")
    space = _load(tmp_path, grid, seeds=3, gpus_per_trial=0.25, max_concurrent=5,
                  checkpoint="rel/net.pth")
    assert space.seeds == (0, 1, 2) and len(space.cells) == 24
    assert space.resources.gpu == 0.25 and space.max_concurrent == 5
    assert space.cells[0].config.checkpoint == str(tmp_path / "rel" / "net.pth")
    assert "checkpoint=" in _error(tmp_path, grid, checkpoint=str(tmp_path / "missing.pth"))
    assert "no such file or folder" in _error(tmp_path, grid, checkpoint=str(tmp_path / "missing.pth"))
    assert "pass --backgrounds DIR" in _error(tmp_path, GRID, data=str(tmp_path / "rel"))


def test_search_space(tmp_path):
    space = _load(tmp_path, SEARCH)
    assert space.cells == () and space.search is not None
    assert [p.name for p in space.search.params] == ["lambda_", "margin"]
    assert space.search.asha == {"grace_period": 2}
    cfg = space.search_config({"lambda_": 0.3, "margin": 0.05})
    assert (cfg.k, cfg.lambda_, cfg.margin, cfg.seed) == (2, 0.3, 0.05, 0)
    low = {p.name: p.args[0] for p in space.search.params}
    assert space.search_probe() == space.search_config(low)
    assert _load(tmp_path, GRID).search_probe() is None


def test_shipped_spaces_load(tmp_path):
    demo = load_space(ROOT / "search_spaces" / "demo.yaml")
    # 3 seeds x (the reference + the control + 12 cells), the two lambda_=0 cells of a seed one trial
    assert len(demo.cells) == 42 and len(demo.trials()) == 39
    assert {c.seed for c in demo.cells} == {0, 1, 2}
    assert [c.kind for c in demo.cells[:3]] == ["reference", "control", "cascade"]
    optuna = load_space(ROOT / "search_spaces" / "lambda_optuna.yaml")
    assert optuna.search is not None and optuna.search.algorithm == "optuna"
    for image in ("Flare7Kpp/Flare7K/Scattering_Flare/Compound_Flare/f.png", "Flickr24K/b.jpg",
                  "Flare7Kpp/test_data/real/input/000.png", "Flare7k/Scattering_Flare/Compound_Flare/f.png"):
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_bytes(b"not decoded: fingerprints read names and sizes")
    (tmp_path / "net.pth").touch()
    # table1.yaml: Flare7K v1 data, and the masked real test images given explicitly.
    assert "needs --test-data DIR" in _error(tmp_path, (ROOT / "search_spaces" / "table1.yaml").read_text(),
                                             data=str(tmp_path / "Flare7k"), checkpoint=str(tmp_path / "net.pth"))
    table1 = load_space(ROOT / "search_spaces" / "table1.yaml", data=str(tmp_path / "Flare7k"),
                        checkpoint=str(tmp_path / "net.pth"),
                        test_data=str(tmp_path / "Flare7Kpp" / "test_data" / "real"))
    assert table1.cells[0].config.backgrounds == str(tmp_path / "Flickr24K")  # found beside data
    assert [c.kind for c in table1.cells[:2]] == ["reference", "control"]
    assert {(c.k, c.lambda_) for c in table1.cells if c.kind == "cascade"} == {
        (k, lam) for k in (1, 2) for lam in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)}
    cfg = table1.cells[2].config
    assert (cfg.encoder, cfg.crop, cfg.base_kind, cfg.data_loader) == ("vit_l16_swag_e2e", 128, "flare7k", "flare7k")
    assert (cfg.eval_mode, cfg.eval_size, cfg.random_erasing_on) == ("resize-bilinear", 128, "background")
    assert table1.seeds == (0, 1, 2)
    assert space_name(ROOT / "search_spaces" / "table1.yaml") == "table1"
    assert load_space(ROOT / "search_spaces" / "table1.yaml", data=str(tmp_path / "Flare7k"),
                      checkpoint=str(tmp_path / "net.pth"), seeds=1,
                      test_data=str(tmp_path / "Flare7Kpp" / "test_data" / "real"),
                      eval_mode="tiles").cells[0].config.eval_mode == "tiles"
    pp = load_space(ROOT / "search_spaces" / "table1_flare7kpp.yaml", data=str(tmp_path / "Flare7Kpp"),
                    checkpoint=str(tmp_path / "net.pth"))
    assert (pp.cells[2].config.base_kind, pp.cells[2].config.eval_mode) == ("flare7kpp", "native")


# -- schema errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("old, new, expected", [
    ("max_failures: 1", "max_failure: 1", "unknown key 'max_failure'; expected one of name, grid"),
    ("steps: 10", "step: 10", "fixed: unknown key 'step' (did you mean 'steps'?)"),
    ("k: [1, 2]", "kk: [1, 2]", "grid: unknown key 'kk'"),
    ("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpus: 0}", "resources: unknown key 'gpus'"),
    ("k: [1, 2]", "k: []", "grid.k is empty"),
    ("lambda_: [1.0, 0.5, 0.0]", "lambda_: [1.5]", "cell k=1, lambda_=1.5, seed=0: lambda_=1.5 is invalid; expected a number in [0, 1]"),
    ("k: [1, 2]", "k: [1, 3]", "k=3 is invalid; expected 1 or 2"),
    ("k: [1, 2]", "k: [1, 1]", "grid.k=[1, 1] repeats a value"),
    ("seeds: [0, 1]", "seeds: []", "seeds=[] is invalid"),
    ("max_concurrent: 2", "max_concurrent: 0", "max_concurrent=0 is invalid"),
    ("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: 1.5}", "resources.gpu=1.5 is invalid"),
    ("steps: 10", "steps: 10\n  device: cuda", "device: cuda needs resources.gpu > 0"),
    ("steps: 10", "steps: 10\n  k: 2", "k is in both grid and fixed"),
    ("steps: 10", "steps: 10\n  seed: 2", "fixed.seed is set by the sweep"),
    ("name: grid", "name: ../up", "name='../up' is invalid"),
    ("# Which k and lambda_ are best? (a test space)\n", "", "start the file with a comment"),
    ("max_failures: 1", "max_failures: 1\nmax_failures: 2", "duplicate key 'max_failures'"),
    ("reference: true", "reference: yes please", "reference='yes please' is invalid"),
])
def test_schema_errors_name_the_file_and_key(tmp_path, old, new, expected):
    assert old in GRID
    message = _error(tmp_path, GRID.replace(old, new))
    assert message.startswith(str(tmp_path / "space.yaml"))
    assert expected in message


@pytest.mark.parametrize("old, new, expected", [
    ("uniform: [0.0, 1.0]", "uniform: [0.0, 1.5]", "search.params.lambda_: lambda_=1.5 is invalid"),
    ("uniform: [0.0, 1.0]", "uniform: [1.0, 0.0]", "is empty; expected low < high"),
    ("loguniform: [0.01, 1.0]", "loguniform: [0.0, 1.0]", "loguniform needs low > 0"),
    ("uniform: [0.0, 1.0]", "normal: [0.0, 1.0]", "unknown distribution 'normal'"),
    ("metric: psnr_entire", "metric: psnr", "search.metric='psnr'; expected one of psnr_entire"),
    ("num_samples: 4", "num_samples: 0", "search.num_samples=0"),
    ("grace_period: 2", "grace: 2", "search.scheduler.asha: unknown key 'grace'"),
    ("algorithm: optuna", "algorithm: hyperopt", "search.algorithm='hyperopt'"),
    ("fixed: {k: 2}", "fixed: {k: 2, lambda_: 0.5}", "lambda_ is also in fixed"),
    ("seeds: [0]", "seeds: [0, 1]", "a search runs one seed"),
    ("fixed: {k: 2}", "fixed: {k: 2}\ngrid: {k: [1]}", "give either grid or search"),
])
def test_search_schema_errors(tmp_path, old, new, expected):
    assert old in SEARCH
    assert expected in _error(tmp_path, SEARCH.replace(old, new))


def test_requires_names_the_flags_and_scientific_notation_reads_as_float(tmp_path):
    text = GRID.replace("reference: true", "reference: true\nrequires: [data, checkpoint]").replace(
        "steps: 10", "steps: 10\n  base_kind: flare7kpp")
    assert "needs --data DIR and --checkpoint PATH" in _error(tmp_path, text)
    (tmp_path / "x.pth").touch()
    assert "needs --data DIR (the command with every input is at the top of the file" in _error(
        tmp_path, text, checkpoint=str(tmp_path / "x.pth"))
    space = _load(tmp_path, GRID.replace("steps: 10", "steps: 10\n  lr: 1e-3"))
    assert space.cells[1].config.lr == 1e-3
    assert "cannot read search space" in str(pytest.raises(UserError, load_space, tmp_path / "no.yaml").value)
