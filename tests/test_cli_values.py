"""One reader for values typed on the command line: `--set`, `--param`, lm-eval model_args strings and
grid overrides read the same text as the same value (wdmoe.config.parse_value, TOML literals)."""

import dataclasses
import math

import pytest

from wdmoe.cli.common import parse_params
from wdmoe.config import parse_override, parse_value
from wdmoe.errors import ConfigError
from wdmoe.studies.sweep import GRID_FIELDS, Grid, describe, expand, parse_grid

CASES = [
    ("0.1", 0.1),
    ("10e6", 1e7),
    ("3", 3),
    ("true", True),
    ("True", True),
    ("FALSE", False),
    ("inf", math.inf),
    ("[1, 2]", [1, 2]),
    ('"7"', "7"),
    ("minmax", "minmax"),
    ("/tmp/model", "/tmp/model"),
    ("1979-05-27", "1979-05-27"),  # a TOML date stays text
    (" 0.5 ", 0.5),
]


@pytest.mark.parametrize(("text", "value"), CASES, ids=[c[0] for c in CASES])
def test_set_and_param_read_a_value_as_the_same_toml_literal(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert parse_override(f"cell.x={text}") == (["cell", "x"], value)
    assert parse_params([f"x={text}"]) == {"x": value}


def test_lm_eval_model_args_strings_read_values_as_set_does():
    adapter = pytest.importorskip("wdmoe.lmeval.adapter", reason="lm-eval is not installed")
    plain = [(t, v) for t, v in CASES if "," not in t]  # commas separate model_args
    args = adapter.parse_arg_string(",".join(f"a{i}={t}" for i, (t, _) in enumerate(plain)))
    assert args == {f"a{i}": v for i, (_, v) in enumerate(plain)}
    assert adapter.parse_arg_string("overrides=a.b=1;c.d=x") == {"overrides": "a.b=1;c.d=x"}
    with pytest.raises(ConfigError, match="model_args 'colour' is not NAME=VALUE"):
        adapter.parse_arg_string("policy=wdmoe,colour")


def test_a_pair_without_a_name_or_value_is_named():
    with pytest.raises(ConfigError, match="policy parameter '=1' is not NAME=VALUE"):
        parse_params(["=1"])
    with pytest.raises(ConfigError, match="override 'cell' is malformed"):
        parse_override("cell")


def test_grid_fields_follow_the_grid_dataclass():
    names = {f.name for f in dataclasses.fields(Grid)} - {"policies"}
    assert set(GRID_FIELDS) == names
    assert GRID_FIELDS["bandwidths_hz"] == (float, True) and GRID_FIELDS["top_k"] == (int, True)
    assert GRID_FIELDS["data_dir"] == (str, False) and GRID_FIELDS["limit"] == (int, False)


def test_a_point_describes_its_bandwidth_from_the_override_it_carries():
    grid = parse_grid({"tasks": ["arc_easy"], "bandwidths_hz": [2e7], "policy": [{"name": "topk"}]})
    (point,) = expand(grid)
    assert describe(point)["bandwidth"] == "20 MHz" and describe(point)["seed"] == "0"
