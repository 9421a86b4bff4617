"""TrialConfig: built once from a dict or a file, unknown keys and bad values rejected by name;
the field classes and the digest behind trial ids."""

import dataclasses
import json

import pytest

from cascade import config
from cascade.config import TrialConfig
from cascade.errors import UserError
from cascade.io import digest


def test_defaults_are_the_papers_settings():
    cfg = TrialConfig()
    assert (cfg.delta, cfg.lr, cfg.optimizer, cfg.crop) == (1e-3, 1e-3, "sgd", 128)
    assert cfg.encoder == "vit_l16_swag" and cfg.encoder_pretrained is True
    assert cfg.device == "cpu"


def test_round_trip_and_frozen():
    cfg = TrialConfig.from_dict({"k": 1, "lambda_": 0.4, "seed": 3})
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 2  # type: ignore[misc]


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(UserError, match=r"space.yaml: unknown key 'lamda_' \(did you mean 'lambda_'\?\)"):
        TrialConfig.from_dict({"lamda_": 0.5}, where="space.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("k", 3, r"k=3 is invalid; expected 1 or 2"),
        ("lambda_", 1.5, r"lambda_=1.5 is invalid; expected a number in \[0, 1\]"),
        ("lambda_", -0.1, r"lambda_=-0.1 is invalid"),
        ("delta", -1e-3, r"delta=-0.001 is invalid; expected a finite number >= 0"),
        ("optimizer", "rmsprop", r"optimizer='rmsprop' is invalid; expected one of sgd, adam, adamw"),
        ("protocol", "paper", r"protocol='paper' is invalid"),
        ("steps", -1, r"steps=-1 is invalid; expected an integer >= 0"),
        ("output_ch", 4, r"output_ch=4 is invalid"),
        ("k", 1.5, r"k=1.5 is invalid; expected an integer"),
        ("k", "2", r"k='2' is invalid; expected an integer"),
        ("encoder_pretrained", "yes", r"encoder_pretrained='yes' is invalid; expected true or false"),
        ("lr", 0, r"lr=0.0 is invalid; expected a finite number > 0"),
        ("encoder", None, r"encoder must not be null"),
        ("encoder", "vgg", r"config: unknown encoder 'vgg'; expected one of vit_l16_swag"),
    ],
)
def test_bad_values_are_named(key, value, message):
    with pytest.raises(UserError, match=message):
        TrialConfig.from_dict({key: value})


def test_yaml_scalars_are_coerced():
    cfg = TrialConfig.from_dict({"lambda_": 1, "k": 2.0, "checkpoint": None})
    assert isinstance(cfg.lambda_, float) and cfg.lambda_ == 1.0
    assert isinstance(cfg.k, int) and cfg.k == 2


def test_real_data_needs_backgrounds():
    with pytest.raises(UserError, match="needs backgrounds"):
        TrialConfig.from_dict({"data": "/data/Flare7Kpp"})


def test_digest_is_stable_and_sensitive():
    a = TrialConfig.from_dict({"k": 1, "lambda_": 0.2})
    assert a.digest() == TrialConfig.from_dict({"lambda_": 0.2, "k": 1}).digest()
    assert a.digest() != a.replace(lambda_=0.4).digest()
    assert a.digest(("embed_dim",)) == a.replace(lambda_=0.4).digest(("embed_dim",))
    assert len(a.digest()) == 12


def test_local_weights_need_pretrained():
    with pytest.raises(UserError, match="encoder_weights='/w.pth' needs encoder_pretrained: true"):
        TrialConfig.from_dict({"encoder_weights": "/w.pth", "encoder_pretrained": False})


def test_data_parallel_settings_are_checked():
    with pytest.raises(UserError, match="workers=2 needs backend: ddp or horovod"):
        TrialConfig.from_dict({"workers": 2})
    with pytest.raises(UserError, match="batch_size=5 must be divisible by workers=2"):
        TrialConfig.from_dict({"workers": 2, "backend": "ddp", "batch_size": 5})


def test_yaml_exponent_without_dot_is_a_number():
    import yaml

    values = yaml.safe_load("lr: 1e-3\nbase_lr: 2E-4\nmargin: .5")
    assert values["lr"] == "1e-3"  # the PyYAML quirk this guards against
    cfg = TrialConfig.from_dict(values)
    assert (cfg.lr, cfg.base_lr, cfg.margin) == (1e-3, 2e-4, 0.5)
    with pytest.raises(UserError, match="lr='fast' is invalid; expected a number"):
        TrialConfig.from_dict({"lr": "fast"})


def test_field_classes_partition_and_name_real_fields():
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    assert set(config.ID_FIELDS) | set(config.RUNTIME_FIELDS) == names
    assert not set(config.ID_FIELDS) & set(config.RUNTIME_FIELDS)
    assert list(config.ID_FIELDS) == sorted(config.ID_FIELDS)
    assert set(config.RUNTIME_FIELDS) <= set(config.RESUME_MAY_CHANGE)
    for group in (config.RESUME_MAY_CHANGE, config.PATH_FIELDS, config.BASE_FIELDS, config.TEST_FIELDS):
        assert set(group) <= names, group
    # The classes as they were before they moved here (cascade.space, cascade.train, cascade.base):
    assert config.RUNTIME_FIELDS == ("num_workers", "eval_workers", "checkpoint_every", "log_every",
                                     "base_cache", "eval_every")
    assert set(config.RESUME_MAY_CHANGE) == {
        "num_workers", "eval_workers", "checkpoint_every", "log_every", "base_cache", "fail_at_step",
        "n_samples", "workers", "backend", "device", "compile", "eval_every"}
    assert config.BASE_FIELDS == ("embed_dim", "depth", "win_size", "output_ch", "base_steps",
                                  "base_lr", "crop", "batch_size")
    assert config.TEST_FIELDS == ("n_test", "test_size")


def test_digest_is_io_digest_of_the_fields():
    cfg = TrialConfig.from_dict({"k": 1, "lambda_": 0.4})
    assert cfg.digest(("k", "lambda_")) == digest({"k": 1, "lambda_": 0.4})
    assert cfg.digest() == digest(cfg.to_dict())
    # Known values, from TrialConfig.digest before it used io.digest (trial ids depend on them).
    assert TrialConfig().digest(("k", "lambda_")) == "57d4cb71c6f9"
    assert cfg.digest(config.ID_FIELDS) != TrialConfig().digest(config.ID_FIELDS)
    assert cfg.digest(config.ID_FIELDS) == cfg.replace(log_every=3, base_cache="/x").digest(config.ID_FIELDS)


def test_from_file_applies_overrides_as_yaml(tmp_path):
    path = tmp_path / "trial.json"
    path.write_text(json.dumps({"k": 1, "steps": 5}))
    cfg = TrialConfig.from_file(path, ["lambda_=0.2", "encoder_pretrained=false", "checkpoint=null"])
    assert (cfg.k, cfg.steps, cfg.lambda_, cfg.encoder_pretrained) == (1, 5, 0.2, False)
    yaml_file = tmp_path / "trial.yaml"
    yaml_file.write_text("lr: 1e-3\nbase_lr: 2E-4\n")
    cfg = TrialConfig.from_file(yaml_file, ["margin=1e-2"])
    assert (cfg.lr, cfg.base_lr, cfg.margin) == (1e-3, 2e-4, 1e-2)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert TrialConfig.from_file(empty) == TrialConfig()


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("lr: 1\nlr: 2\n", [], r"trial.yaml: not valid YAML/JSON \(duplicate key 'lr'\)$"),
    ("k: [1\n", [], r"trial.yaml: not valid YAML/JSON \(while parsing a flow sequence\)$"),
    ("- 1\n", [], r"trial.yaml: expected a mapping of config keys$"),
    ("k: 1\n", ["k"], r"--set 'k': expected key=value$"),
    ("k: 1\n", ["k=[1"], r"--set 'k=\[1': not valid YAML \(.+\)$"),
    ("k: 1\n", ["lamda_=0.3"], r"trial.yaml \(with --set\): unknown key 'lamda_'"),
])
def test_from_file_errors_are_one_line_naming_the_file(tmp_path, text, overrides, message):
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        TrialConfig.from_file(path, overrides)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"missing.yaml: cannot read config \(No such file"):
        TrialConfig.from_file(tmp_path / "missing.yaml")
