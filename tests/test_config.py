"""Typed config: defaults, overrides and clear errors."""
import pytest

from stars_scale.config import RunConfig, config_from_dict, load_config
from stars_scale.errors import ConfigError


def test_defaults_and_overrides():
    cfg = config_from_dict({"model": {"hidden": 64}}, ["stars.lam=0.25", "eval.depths=[1,2,4]", "depth.dist=lognormal"])
    assert cfg.model.hidden == 64 and cfg.stars.lam == 0.25 and cfg.eval.depths == [1, 2, 4]
    assert cfg.depth.dist == "lognormal"
    assert isinstance(config_from_dict({}), RunConfig)


@pytest.mark.parametrize("data,overrides,needle", [
    ({"model": {"hiddn": 64}}, [], "model.hiddn: unknown config key"),
    ({"model": {"hidden": "big"}}, [], "model.hidden: expected an integer, got 'big'"),
    ({"depth": {"dist": "gaussian"}}, [], "depth.dist: expected one of"),
    ({}, ["depth.value=-3"], "depth.value: must be >= 1, got -3"),
    ({}, ["eval.depths=[4,-1]"], "eval.depths[1]: must be >= 1, got -1"),
    ({}, ["stars.lam=2"], "stars.lam: must be <= 1 with combine: convex"),
    ({"model": {"hidden": 30, "heads": 4}}, [], "model.heads: hidden 30 is not divisible by heads 4"),
    ({}, ["noequals"], "expected key=value"),
    ({"model": 3}, [], "model: expected a mapping"),
    # a field of another task is still checked (found by the fuzz suite: data.chains -24613283 trained)
    ({"data": {"kind": "arithmetic", "chains": -24613283}}, [], "data.chains: must be >= 2"),
    ({}, ["data.difficulty=[3,1]"], "data.difficulty: expected [lo, hi]"),
])
def test_bad_input_names_the_field(data, overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert {"arith_tiny.yaml", "collapse_stars.yaml", "huginn_3p5b.yaml", "looped_1b_1gpu.yaml"} <= {p.name for p in paths}
    for path in paths:
        load_config(path)
