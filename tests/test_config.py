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


@pytest.mark.parametrize("override, shown", [
    ("data.batch_size=0", "'data.batch_size' must be >= 1, got 0"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
    ("model.dropout=1.0", "'model.dropout' must be in [0, 1), got 1.0"),
    ("model.dropout=-0.1", "'model.dropout' must be in [0, 1), got -0.1"),
    ("train.learning_rate=0", "'train.learning_rate' must be > 0, got 0.0"),
    ("train.target_sensitivity=1.5", "'train.target_sensitivity' must be in [0, 1], got 1.5"),
    ("augment.zoom=1", "'augment.zoom' must be in [0, 1), got 1.0"),
    ("tune.heartbeat_interval=0", "'tune.heartbeat_interval' must be >= 1, got 0"),
])
def test_values_out_of_range_name_key_and_value(override, shown):
    with pytest.raises(ConfigError) as e:
        load_config(EXPERIMENTS / "smoke.toml", [override])
    assert shown in str(e.value) and "\n" not in str(e.value)


def test_range_edges_are_accepted():
    cfg = load_config(EXPERIMENTS / "smoke.toml", ["data.batch_size=1", "train.epochs=1", "model.dropout=0.0",
                                                    "model.dropout=0.999", "train.threshold_policy=sensitivity",
                                                    "train.target_sensitivity=1.0"])
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.model.dropout) == (1, 1, 0.999)


def test_range_checks_apply_to_files_and_search_spaces(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nbatch_size = -4\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*data\.batch_size.*>= 1, got -4"):
        load_config(bad)
    bad.write_text('[tune.space]\n"model.dropout" = { type = "float", low = 0.0, high = 1.0 }\n')
    with pytest.raises(ConfigError, match=r"model\.dropout.*\[0, 1\), got 1\.0"):
        load_config(bad)  # the sampler could propose dropout 1.0: refused before the study starts
    bad.write_text('[tune.space]\n"data.batch_size" = { type = "categorical", choices = [16, 0] }\n')
    with pytest.raises(ConfigError, match=r"data\.batch_size.*got 0"):
        load_config(bad)


def test_every_bound_names_a_numeric_key():
    from pipeline.config import BOUNDS, field_type

    for key in BOUNDS:
        assert field_type(key) in (int, float), key


def test_every_config_key_is_read_by_the_pipeline():
    """A key nothing reads is a setting that silently does nothing (tune.grace_period did): each dataclass field
    must be read as an attribute (`.epochs`) somewhere in pipeline/ outside config.py."""
    import re

    sources = "\n".join(p.read_text() for p in (EXPERIMENTS.parent / "pipeline").rglob("*.py")
                        if p.name != "config.py")
    unread = [key for key in Config().flat() if key != "name"
              and not re.search(rf"\.{re.escape(key.split('.', 1)[1])}\b", sources)]
    assert unread == [], f"config keys nothing reads: {unread}"
    assert "tune.grace_period" not in Config().flat()
