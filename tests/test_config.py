import pytest
import yaml

from pipeline.base.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_override,
)


def test_layers_apply_in_order(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"model": {"name": "resnet20"}, "train": {"epochs": 7}}))
    config = load_config("digits", str(experiment), ["train.lr=0.01"])
    assert config.run_name == "exp-lr0.01"  # a result-changing override names a new experiment
    assert config.model.name == "resnet20"
    assert config.train.epochs == 7  # experiment over code default
    assert config.train.lr == 0.01  # override over everything
    assert config.augment.image_size == 32  # competition default over code default
    assert config.train.batch_size == 64  # code default
    assert config.data.classes == [str(d) for d in range(10)]  # numbers become strings


def test_model_without_file_runs_on_defaults():
    config = load_config("digits", "timm/resnet26d")
    assert config.model.name == "timm/resnet26d"
    assert config.run_name == "timm-resnet26d"


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key \(did you mean train\.epochs\?\)"):
        load_config("digits", "resnet20", ["train.epochz=3"])


def test_unknown_section_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(valid keys: run_name, data"):
        load_config("digits", "resnet20", ["zzz=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: .*integer.*'ten'"):
        load_config("digits", "resnet20", ["train.epochs=ten"])


def test_bad_choice_names_key():
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        load_config("digits", "resnet20", ["train.optimizer=lion"])


def test_unknown_competition_lists_known():
    with pytest.raises(ConfigError, match=r"not found; known: \[.*'digits'"):
        load_config("nope")


def test_data_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "root": "x", "classes": [1, 2],
                                    "image_path": "{name}.png", "metrix": "qwk"}))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert "data.metrix: unknown key (did you mean data.metric?)" in message
    assert "data.image_path" in message and "{id}" in message


def test_override_values_are_yaml():
    assert parse_override("train.milestones=[10, 20]") == {"train": {"milestones": [10, 20]}}
    assert parse_override("refit.epochs=null") == {"refit": {"epochs": None}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_resolved_config_round_trips():
    config = load_config("digits", "resnet20", ["train.epochs=2"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_config_is_frozen():
    config = load_config("digits", "resnet20")
    with pytest.raises(Exception):
        config.train.epochs = 3


def test_the_experiment_name_follows_the_result_changing_overrides():
    def name(*overrides, **kw):
        return load_config("digits", "resnet18", list(overrides), **kw).run_name

    assert name() == "resnet18"
    assert name("train.lr=0.01", "train.epochs=30") == "resnet18-epochs30-lr0.01"
    assert name("train.seed=1") == "resnet18-seed1"
    assert name("train.epochs=15") == "resnet18"  # the experiment file's own value: no change
    # speed, place and later-stage settings are no part of the identity
    assert name("train.workers=3", "train.device=cpu", "train.compile=true", "cache.enabled=true",
                "cache.dir=/tmp/c", "tta.views=d4", "ensemble.method=fitted", "refit.epochs=3",
                "runs_dir=/tmp/r") == "resnet18"
    long = name("train.lr=0.01", "train.epochs=30", "augment.image_size=64", "train.batch_size=8",
                "train.weight_decay=0.0001")
    assert long.startswith("resnet18-h") and len(long) == len("resnet18-h") + 8
    assert name("train.lr=0.01", name="mine") == "mine"
    with pytest.raises(ConfigError, match="NAME="):
        name(name="../escape")


def test_class_weights_default_to_sqrt_inverse_except_where_they_would_correct_twice_or_skew():
    assert TrainConfig().class_weights == "sqrt_inverse"
    # the balanced sampler corrects the imbalance already; a setting of one's own still wins
    assert TrainConfig(sampler="balanced").class_weights == "none"
    assert TrainConfig(sampler="balanced", class_weights="inverse").class_weights == "inverse"


def test_a_log_loss_competition_trains_without_class_weights(tmp_path):
    path = tmp_path / "probs.yaml"
    competition = {"name": "probs", "root": str(tmp_path), "classes": ["a", "b"],
                   "image_path": "{id}.png", "metric": "log_loss"}
    path.write_text(yaml.safe_dump(competition))
    assert load_config(str(path), "resnet20").train.class_weights == "none"
    assert load_config(str(path), "resnet20", ["train.class_weights=inverse"]) \
        .train.class_weights == "inverse"
    competition["metric"] = "accuracy"
    path.write_text(yaml.safe_dump(competition))
    assert load_config(str(path), "resnet20").train.class_weights == "sqrt_inverse"
