"""Bad policy parameters, broken model folders and broken expert shards: one clear error each,
never a traceback (the CLI prints one `error: …` line and exits with 2)."""

import json
import shutil

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from tiny import tiny_model
from wdmoe.cli import app
from wdmoe.errors import ConfigError, ModelFolderError, ModelNotFoundError
from wdmoe.models.experts import ExpertWeights
from wdmoe.models.loading import check_model_folder, load_checkpoint
from wdmoe.models.split import ShardId, load_expert_shard, save_expert_shard, split_model
from wdmoe.policies import make_policy

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *fragments):
    """Exit 2, no traceback, one `error:` line holding every fragment."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# A. policy parameters ---------------------------------------------------------------------------

BAD_PARAMS = [
    ("wdmoe", {"theta": "abc"}, ["policy 'wdmoe'", "theta='abc'", "must be float", "k_scaled: bool"]),
    ("wdmoe", {"nosuch": 1}, ["policy 'wdmoe'", "does not take nosuch=1", "theta: float, k_scaled: bool"]),
    ("wdmoe", {"k_scaled": 1}, ["k_scaled=1", "must be bool"]),
    ("topk", {"k": 2.5}, ["policy 'topk'", "k=2.5", "must be int | None"]),
    ("topk", {"theta": 0.2}, ["does not take theta=0.2", "k: int | None"]),
    ("budget", {"tau_s": "fast"}, ["policy 'budget'", "tau_s='fast'", "tau_s: float"]),
    ("joint", {"allocator": 3}, ["allocator=3", "must be str"]),
]


@pytest.mark.parametrize(("name", "params", "fragments"), BAD_PARAMS, ids=[str(p) for _, p, _ in BAD_PARAMS])
def test_make_policy_names_the_policy_parameter_value_and_accepted_ones(name, params, fragments):
    with pytest.raises(ConfigError) as info:
        make_policy(name, **params)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_make_policy_still_takes_right_values_and_ints_for_floats():
    assert make_policy("wdmoe", theta=0, k_scaled=True).theta == 0
    assert make_policy("topk", k=None).k is None and make_policy("topk", k=1).k == 1


def test_a_constructor_value_error_becomes_a_config_error(monkeypatch):
    from dataclasses import dataclass

    from wdmoe.policies import POLICIES

    @dataclass(frozen=True)
    class Picky:
        level: int = 0
        name: str = "picky"

        def __post_init__(self) -> None:
            if self.level > 3:
                raise ValueError(f"level {self.level} is too high")

    monkeypatch.setitem(POLICIES._items, "picky", Picky)
    with pytest.raises(ConfigError, match=r"policy 'picky' with \{'level': 9\}: level 9 is too high"):
        make_policy("picky", level=9)


@pytest.mark.parametrize(
    ("param", "fragments"),
    [("theta=abc", ["policy 'wdmoe'", "theta='abc'", "must be float"]), ("nosuch=1", ["nosuch=1"])],
)
def test_eval_with_a_bad_param_is_one_line(ckpt, tmp_path, param, fragments):
    item = {"query": "Question: what is a router?", "choices": ["an expert", "a device"], "gold": 0}
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps(item) + "\n")
    args = ["eval", "--tasks", "arc_easy", "--model", ckpt, "--data-dir", tmp_path, "--limit", 1]
    res = run(*args, "--out", tmp_path / "r.jsonl", "--policy", "wdmoe", "--param", param)
    assert_one_line_error(res, *fragments)


@pytest.mark.parametrize("param", ["theta=abc", "nosuch=1"])
def test_serve_bs_with_a_bad_param_is_one_line(param):
    res = run("serve-bs", "--policy", "wdmoe", "--param", param, "--token", "t")
    assert_one_line_error(res, "policy 'wdmoe'", param.split("=")[0])


# B. broken model folders ------------------------------------------------------------------------


@pytest.fixture
def folder(ckpt, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    return shutil.copytree(ckpt, tmp_path / "model")


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKS = {
    "not-json": (lambda f: (f / "config.json").write_text("{oops"), ["config.json is not valid JSON"]),
    "json-list": (lambda f: (f / "config.json").write_text("[1]"), ["config.json must hold a JSON object"]),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), ["has no weights file", "model.safetens"]),
    "garbage-weights": (
        lambda f: (f / "model.safetensors").write_bytes(b"not a tensor file " * 8),
        ["model.safetensors is not a readable safetensors file"],
    ),
    "truncated-weights": (
        lambda f: truncate(f / "model.safetensors"),
        ["model.safetensors is not a readable safetensors file"],
    ),
    "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), ["has no tokenizer", "tokenizer.json"]),
    "wrong-type": (
        lambda f: edit_config(f, num_hidden_layers="two"),
        ["config.json", "num_hidden_layers", "'two'"],
    ),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_check_model_folder_names_the_file_and_the_fault(folder, case):
    breaks, fragments = BREAKS[case]
    breaks(folder)
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_check_model_folder_passes_a_good_folder_and_refuses_a_missing_one(ckpt, tmp_path):
    check_model_folder(ckpt)
    with pytest.raises(ModelNotFoundError, match="is not a folder"):
        check_model_folder(tmp_path / "nothing")


@pytest.mark.parametrize("case", list(BREAKS))
def test_generate_on_a_broken_folder_is_one_line(folder, case):
    breaks, fragments = BREAKS[case]
    breaks(folder)
    assert_one_line_error(run("generate", "hi", "--model", folder, "--max-new-tokens", 1), *fragments)


@pytest.mark.parametrize("case", ["json-list", "garbage-weights", "no-tokenizer", "wrong-type"])
def test_model_split_on_a_broken_folder_is_one_line(folder, tmp_path, case):
    breaks, fragments = BREAKS[case]
    breaks(folder)
    res = run("model", "split", tmp_path / "out", "--model", folder)
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not-json", "truncated-weights"])
def test_serve_bs_on_a_broken_folder_is_one_line(folder, case):
    breaks, fragments = BREAKS[case]
    breaks(folder)
    assert_one_line_error(run("serve-bs", "--model", folder, "--token", "t", "--port", 0), *fragments)


def test_cluster_on_a_broken_folder_is_one_line(folder):
    breaks, fragments = BREAKS["truncated-weights"]
    breaks(folder)
    res = run("cluster", "--model", folder, "--devices", 1, "--max-new-tokens", 1)
    assert_one_line_error(res, *fragments)


def test_cluster_with_a_bad_param_is_one_line(ckpt):
    res = run("cluster", "--model", ckpt, "--devices", 1, "--policy", "wdmoe", "--param", "theta=abc")
    assert_one_line_error(res, "policy 'wdmoe'", "theta='abc'")


def test_weights_that_do_not_fit_the_config_are_named(folder):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"][:3].contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=r"loading the checkpoint failed") as info:
        load_checkpoint(str(folder))
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


# C. expert shards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    split_model(tiny_model("mixtral"), folder)
    return folder / ShardId(1, 5).filename


def test_a_good_shard_loads(shard):
    got, weights = load_expert_shard(shard)
    assert (got.layer, got.expert) == (1, 5) and weights.act == "silu"


def test_a_missing_shard_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"nope\.safetensors does not exist"):
        load_expert_shard(tmp_path / "nope.safetensors")


def test_a_text_file_or_truncated_shard_is_named(shard, tmp_path):
    text = tmp_path / "text.safetensors"
    text.write_text("hello, I am not a shard\n")
    cut = shutil.copy(shard, tmp_path / "cut.safetensors")
    truncate(cut)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (text, cut, empty):
        with pytest.raises(ConfigError, match=f"{path.name} is not a readable safetensors file"):
            load_expert_shard(path)


def test_a_safetensors_file_without_shard_metadata_is_named(shard, tmp_path):
    import torch

    plain = tmp_path / "plain.safetensors"
    save_file({"gate_up": torch.zeros(4, 2), "down": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ConfigError, match=r"plain\.safetensors is not a wdmoe expert shard"):
        load_expert_shard(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "wdmoe-expert/1"})
    with pytest.raises(ConfigError, match=r"other\.safetensors is not a wdmoe expert shard.*\['w'\]"):
        load_expert_shard(other)
    meta = {"format": "wdmoe-expert/1", "layer": "one", "expert": "2", "act": "silu"}
    bad_meta = tmp_path / "meta.safetensors"
    save_file({"gate_up": torch.zeros(4, 2), "down": torch.zeros(2, 2)}, str(bad_meta), metadata=meta)
    with pytest.raises(ConfigError, match=r"meta\.safetensors: expert shard metadata"):
        load_expert_shard(bad_meta)


def test_a_shard_with_inconsistent_shapes_is_named(tmp_path):
    import torch

    path = save_expert_shard(ExpertWeights(torch.zeros(5, 2), torch.zeros(2, 2)), ShardId(0, 0), tmp_path)
    with pytest.raises(ConfigError, match=r"L000_E000\.safetensors: expert shard shapes"):
        load_expert_shard(path)
