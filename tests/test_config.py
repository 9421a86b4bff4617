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
        ("output_ch", 5, r"expected 3 \(deflared image\) or 6 \(deflared image \+ flare\)"),
        ("reduction", "max", r"reduction='max' is invalid; expected one of mean, sum"),
        ("encoder_features", "patch", r"encoder_features='patch' is invalid; expected one of cls, tokens"),
        ("eval_mode", "large", r"eval_mode='large' is invalid; expected one of native, flare7k-large"),
        ("lpips", "alex", r"lpips='alex' is invalid; expected one of flare7k, standard"),
        ("base_kind", "v1", r"base_kind='v1' is invalid; expected one of flare7k, flare7kpp"),
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


def test_fidelity_defaults_keep_the_old_behaviour():
    cfg = TrialConfig()
    assert (cfg.reduction, cfg.encoder_features, cfg.random_erasing) == ("mean", "cls", 0.0)
    assert (cfg.base_kind, cfg.eval_mode, cfg.lpips, cfg.lpips_weights) == (None, "native", "flare7k", None)
    assert cfg.evaluated_base_kind == config.PROCEDURAL_BASE_KIND == "flare7kpp"


def test_a_checkpoint_needs_its_base_kind_and_the_procedural_base_is_flare7kpp():
    with pytest.raises(UserError) as info:
        TrialConfig.from_dict({"checkpoint": "/ckpt/net_g_last.pth"}, where="space.yaml")
    message = str(info.value)
    assert message.startswith("space.yaml: checkpoint='/ckpt/net_g_last.pth' needs base_kind: ")
    assert "flare7k (the Flare7K v1 release) or flare7kpp" in message and "\n" not in message
    for kind in config.BASE_KINDS:
        cfg = TrialConfig.from_dict({"checkpoint": "/c.pth", "base_kind": kind})
        assert cfg.evaluated_base_kind == kind
    # Without a checkpoint: null or flare7kpp (what the procedural base is); flare7k makes no sense.
    assert TrialConfig.from_dict({"base_kind": "flare7kpp"}).evaluated_base_kind == "flare7kpp"
    with pytest.raises(UserError, match=r"base_kind='flare7k' needs a checkpoint; the procedural base"):
        TrialConfig.from_dict({"base_kind": "flare7k"})


def test_base_kind_against_the_checkpoint_channels():
    config.check_base_kind("/c.pth", "flare7kpp", 6)
    config.check_base_kind("/c.pth", "flare7k", 6)  # the v1 release
    config.check_base_kind("/c.pth", "flare7k", 3)  # a 3-channel v1 variant
    with pytest.raises(UserError, match=r"^/c.pth: base_kind=flare7kpp, but this Uformer has 3 output"):
        config.check_base_kind("/c.pth", "flare7kpp", 3)


def test_torch_free_choices_mirror_the_modules_that_own_them():
    from cascade import lpips_score, model

    assert config.BASE_KINDS == model.BASE_KINDS
    assert config.INFERENCE_MODES == model.MODES
    assert config.LPIPS_CONVENTIONS == tuple(lpips_score.LPIPS_CONVENTIONS)
    assert TrialConfig().lpips == lpips_score.DEFAULT_CONVENTION
    # (REDUCTIONS and ENCODER_FEATURES: tests/test_losses.py and tests/test_encoders.py)


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
    for group in (config.RESUME_MAY_CHANGE, config.PATH_FIELDS, config.BASE_FIELDS, config.TEST_FIELDS,
                  config.EVAL_FIELDS):
        assert set(group) <= names, group
    # Evaluation-only fields: part of the id, none of them changes the weights (a base or the loss).
    assert set(config.EVAL_FIELDS) <= set(config.ID_FIELDS)
    assert "n_test" in config.EVAL_FIELDS
    assert not set(config.EVAL_FIELDS) & set(config.BASE_FIELDS)
    assert not set(config.EVAL_FIELDS) & {"kind", "seed", "k", "lambda_", "delta", "margin",
                                          "reduction", "encoder", "encoder_features", "checkpoint",
                                          "data", "random_erasing", "steps", "lr", "precision"}
    assert {"eval_mode", "lpips", "lpips_weights", "base_kind", "protocol"} <= set(config.EVAL_FIELDS)
    assert "lpips_weights" in config.PATH_FIELDS
    # The classes as they were before they moved here (cascade.space, cascade.train, cascade.base):
    assert config.RUNTIME_FIELDS == ("num_workers", "eval_workers", "checkpoint_every", "log_every",
                                     "base_cache", "eval_every", "stream_cache", "stream_cache_dir")
    # ... plus, since evaluations are identities of their own (issue 18), the evaluation fields
    # and the paths: a new protocol resumes the final checkpoint to evaluate it, a moved mount
    # resumes (the files are identified by their contents, orchestrator.identity).
    assert set(config.RESUME_MAY_CHANGE) == {
        "num_workers", "eval_workers", "checkpoint_every", "log_every", "base_cache", "fail_at_step",
        "n_samples", "workers", "backend", "device", "compile", "eval_every", "stream_cache",
        "stream_cache_dir", *config.EVAL_FIELDS, *config.PATH_FIELDS}
    assert config.BASE_FIELDS == ("embed_dim", "depth", "win_size", "output_ch", "base_steps",
                                  "base_lr", "crop", "batch_size")
    assert config.TEST_FIELDS == ("n_test", "test_size")


# A valid other value for every evaluation-only field.
EVAL_CHANGES = {"protocol": "flare7k", "ssim_window": "gaussian", "test_data": "/t", "n_test": 7,
                "eval_mode": "flare7k-large", "eval_size": 64, "lpips": "standard", "lpips_weights": "/w.pth",
                "base_kind": "flare7kpp", "n_samples": 1}


def test_evaluation_fields_leave_the_procedural_base_alone():
    # What "evaluation-only" promises: the weights a trial starts from (and trains) do not depend
    # on it. The procedural base's cache key covers everything its weights depend on.
    from cascade.pretrain import base_key

    assert set(EVAL_CHANGES) == set(config.EVAL_FIELDS)
    cfg = TrialConfig.from_dict({"embed_dim": 8, "crop": 32})
    for key, value in EVAL_CHANGES.items():
        assert base_key(cfg.replace(**{key: value})) == base_key(cfg), key


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
