"""lm-eval integration on a tiny random Mixtral: the adapter, the offline tasks and the shell entry."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_simulate import TINY
from tiny import WORDS
from wdmoe.errors import ConfigError, UnknownNameError
from wdmoe.eval.harness import evaluate_task
from wdmoe.eval.tasks import get_task
from wdmoe.lmeval import WdmoeLM, local_task_manager, parse_model_args
from wdmoe.lmeval.__main__ import main, with_include_path

SHARED = Path("/work/shared/benchmarks")
OVERRIDES = ";".join(TINY)  # the scenario's model dimensions = the tiny Mixtral's (2 layers × 8 experts)
REQUESTS = [
    ("the router is", " a model"),
    ("hello", " world"),
    ("what is the base station of a wireless cell and why", " the device"),
    ("once upon a time there was", " a small expert that was slow"),
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tiny_data(folder: Path, n: int = 8) -> Path:
    """arc_easy.jsonl / piqa.jsonl in the llm-foundry format, worded in the tiny tokenizer's vocabulary."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, k, tail in (("arc_easy", 4, ""), ("piqa", 2, "\n")):  # PIQA's queries end with a newline
        rows = [
            {
                "query": f"Question: {sentence(rng, rng.randint(3, 9))}?{tail}",
                "choices": [sentence(rng, rng.randint(1, 6)) for _ in range(k)],
                "gold": rng.randrange(k),
            }
            for _ in range(n)
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def manager(tmp_path_factory, data):
    return local_task_manager(tmp_path_factory.mktemp("tasks"), data, include_defaults=False)


def make_lm(ckpt, **args):
    return WdmoeLM(model=str(ckpt), overrides=OVERRIDES, **args)


def instances(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_topk_answers_loglikelihoods_as_plain_hflm_on_the_same_model(ckpt):
    lm = make_lm(ckpt, policy="topk", batch_size=2)
    net = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    plain = HFLM(pretrained=net, tokenizer=AutoTokenizer.from_pretrained(ckpt), batch_size=2)
    got, want = lm.loglikelihood(instances(REQUESTS)), plain.loglikelihood(instances(REQUESTS))
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
    assert lm.latency["requests"] == len(lm.sim.records) > 0  # topk too runs inside the simulation
    assert lm.latency["drop_rate"] == 0.0


def test_a_channel_aware_policy_runs_inside_the_simulation_and_records_every_forward(ckpt):
    lm = make_lm(ckpt, policy="wdmoe", theta=0.3, allocator="minmax", seed=1, top_k=4)
    assert lm.wm.top_k == 4 and lm.args.point.policy.params == {"theta": 0.3}
    lm.loglikelihood(instances(REQUESTS))
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the router is a model",), 0)])
    records = lm.sim.records
    assert len(records) >= 2 and all(r.phase == "prefill" for r in records)  # a new request per forward
    assert lm.latency["requests"] == len(records) and lm.latency["mean_s"] > 0
    assert 0 < lm.latency["drop_rate"] < 1  # θ = 0.3 of 4 candidates drops some
    assert not lm.wm.recorder.enabled  # detached again after each request batch
    assert lm.config()["policy"] == {"name": "wdmoe", "params": {"theta": 0.3}}
    assert lm.config()["scenario"]["overrides"] == TINY


def test_a_model_arg_wins_over_the_cli_default_for_it(ckpt):
    lm = WdmoeLM.create_from_arg_string(
        f"model={ckpt},overrides={OVERRIDES},policy=budget,tau_s=0.01,batch_size=3",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 3 and lm.args.point.policy.params == {"tau_s": 0.01}


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        ({"policy": "nope"}, UnknownNameError, "'nope'"),
        ({"policy": "wdmoe", "theta": "abc"}, ConfigError, "theta='abc'"),
        ({"policy": "wdmoe", "theta": 1.5}, ConfigError, "theta = 1.5"),
        ({"policy": "topk", "theta": 0.1}, ConfigError, "theta=0.1"),
        ({"top_k": 0}, ConfigError, "top_k=0"),
        ({"seed": -1}, ConfigError, "seed=-1"),
        ({"allocator": "bogus"}, UnknownNameError, "'bogus'"),
        ({"colour": "red"}, ConfigError, "colour='red'"),
    ],
)
def test_a_bad_model_arg_raises_naming_the_argument_and_its_value(ckpt, args, error, named):
    with pytest.raises(error, match=named.replace("(", r"\(")):
        make_lm(ckpt, **args)


def test_top_k_beyond_the_experts_names_the_range(ckpt):
    with pytest.raises(ConfigError, match=r"top_k must be in 1\.\.8 .* got 9"):
        make_lm(ckpt, top_k=9)


def test_model_args_split_into_wdmoe_policy_and_hflm_parts():
    raw = {"policy": "wdmoe", "theta": 1, "k_scaled": True, "max_length": 64, "seed": 2}
    args = parse_model_args(raw)
    assert args.point.policy.params == {"theta": 1.0, "k_scaled": True} and args.hflm == {"max_length": 64}
    assert args.point.sim.seed == 2 and args.point.scenario_overrides() == ["model=smollm2-moe8"]


def requests_of(task, limit):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.args)
    return [by_doc[i] for i in sorted(by_doc)]


def assert_same_prompts(manager, data, limit):
    tasks = manager.load(["wdmoe_arc_easy", "wdmoe_piqa"])["tasks"]
    for name in ("arc_easy", "piqa"):
        items = get_task(name).load(data, limit)
        got = requests_of(tasks[f"wdmoe_{name}"], limit)
        assert got == [[(it.context, c) for c in it.continuations] for it in items]


def test_local_tasks_load_offline_with_the_prompts_of_wdmoe_harness(manager, data):
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert_same_prompts(manager, data, None)


@pytest.mark.skipif(not (SHARED / "piqa.jsonl").is_file(), reason=f"no benchmark folder {SHARED}")
def test_local_tasks_on_the_shared_files_give_the_prompts_of_wdmoe_harness(tmp_path):
    assert_same_prompts(local_task_manager(tmp_path, SHARED, include_defaults=False), SHARED, 50)


def test_simple_evaluate_gives_the_accuracy_of_wdmoe_harness(ckpt, manager, data):
    lm = make_lm(ckpt, policy="topk")
    out = lm_eval.simple_evaluate(model=lm, tasks=["wdmoe_arc_easy", "wdmoe_piqa"], task_manager=manager)
    for name in ("arc_easy", "piqa"):
        ours = evaluate_task(name, lm.wm.model, lm.tokenizer, data_dir=data)
        assert out["results"][f"wdmoe_{name}"]["acc,none"] == pytest.approx(ours.metrics["acc"])
        # acc_norm: both divide by the choice's characters without the leading space
        assert out["results"][f"wdmoe_{name}"]["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])
        assert out["n-samples"][f"wdmoe_{name}"]["effective"] == ours.n == 8


def test_include_path_is_added_unless_the_command_gives_one(tmp_path):
    assert with_include_path(["--model", "wdmoe"], tmp_path)[-2:] == ["--include_path", str(tmp_path)]
    given = ["--include_path", "x", "--model", "wdmoe"]
    assert with_include_path(given, tmp_path) == given
    assert with_include_path(["--help"], tmp_path) == ["--help"]


def test_write_tasks_writes_a_yaml_per_task_whose_file_is_there(data, tmp_path, capsys):
    main(["--write-tasks", str(tmp_path), str(data)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wdmoe_arc_easy.yaml", "wdmoe_piqa.yaml"]
    assert "wdmoe_arc_easy, wdmoe_piqa" in capsys.readouterr().out


def test_python_m_wdmoe_lmeval_runs_lm_eval_cli_end_to_end(ckpt, data, tmp_path):
    model_args = f"model={ckpt},policy=wdmoe,theta=0.3,overrides={OVERRIDES},seed=1"
    cmd = [sys.executable, "-m", "wdmoe.lmeval", "--model", "wdmoe", "--model_args", model_args]
    cmd += ["--tasks", "wdmoe_arc_easy,wdmoe_piqa", "--limit", "4", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "WDMOE_DATA": str(data), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wdmoe_arc_easy" in res.stdout and "wdmoe_piqa" in res.stdout  # lm-eval's results table
    assert "wdmoe simulated latency" in res.stderr
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert set(results) == {"wdmoe_arc_easy", "wdmoe_piqa"}
    assert all(0 <= r["acc,none"] <= 1 for r in results.values())


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "arc_easy.jsonl").is_file(), reason=f"no benchmark folder {SHARED}")
def test_the_default_model_answers_through_lm_eval_inside_the_paper_cell(tmp_path):
    lm = WdmoeLM(policy="wdmoe", theta=0.1, top_k=7, allocator="minmax", seed=0, batch_size=4)
    manager = local_task_manager(tmp_path, SHARED, include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["wdmoe_arc_easy"], task_manager=manager, limit=10)
    assert 0 <= out["results"]["wdmoe_arc_easy"]["acc,none"] <= 1
    assert lm.latency["requests"] > 0 and lm.latency["mean_s"] > 0
