"""Experiment files and --set overrides: unknown keys and wrong types fail loudly, naming the key."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, parse_override

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.data.batch_size > 0
    assert path.read_text().startswith("#"), "each experiment file opens with a comment: purpose, command, time"


def test_overrides_are_typed_and_applied():
    cfg = load_config(EXPERIMENTS / "smoke.toml", ["model.blocks=4", "train.learning_rate=1e-2",
                                                    "model.pooling=flatten", "augment.horizontal_flip=true"])
    assert cfg.model.blocks == 4 and cfg.train.learning_rate == 0.01
    assert cfg.model.pooling == "flatten" and cfg.augment.horizontal_flip is True
    assert parse_override("train.learning_rate=1") == ("train.learning_rate", 1)  # int accepted for a float
    assert load_config(EXPERIMENTS / "smoke.toml", ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize("override, needle", [
    ("model.block=4", "model.block"),          # a typo must not silently train the default
    ("modle.blocks=4", "modle.blocks"),
    ("model.blocks=four", "model.blocks"),
    ("model.blocks=2.5", "model.blocks"),
    ("model.pooling=max", "model.pooling"),
    ("train.precision=fp8", "train.precision"),
    ("train.epochs", "not key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(EXPERIMENTS / "smoke.toml", [override])


def test_unknown_keys_in_the_file_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nblocks = 2\nfliters = 8\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*model\.fliters"):
        load_config(bad)
    bad.write_text('[modle]\nblocks = 2\n')
    with pytest.raises(ConfigError, match="modle"):
        load_config(bad)
    bad.write_text('[model\nblocks = 2\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("entry, needle", [
    ('"model.blokcs" = { type = "int", low = 1, high = 3 }', "model.blokcs"),
    ('"model.blocks" = { type = "int", low = 3, high = 1 }', "low < high"),
    ('"train.learning_rate" = { type = "float", low = 0.0, high = 1.0, log = true }', "log"),
    ('"model.blocks" = { type = "float", low = 1, high = 3 }', "not float"),
    ('"model.pooling" = { type = "categorical", choices = ["gap", "max"] }', "model.pooling"),
    ('"model.blocks" = { type = "int", low = 1, high = 3, stepp = 1 }', "unknown fields"),
])
def test_search_space_is_validated(tmp_path, entry, needle):
    f = tmp_path / "space.toml"
    f.write_text(f"[tune.space]\n{entry}\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(f)


def test_flat_params_cover_every_setting_and_round_trip():
    cfg = load_config(EXPERIMENTS / "smoke.toml")
    flat = cfg.flat()
    assert flat["model.blocks"] == cfg.model.blocks and "tune.space" not in flat
    rebuilt = Config(name=flat.pop("name")).with_values({**flat, "tune.space": cfg.tune.space})
    assert rebuilt == cfg
