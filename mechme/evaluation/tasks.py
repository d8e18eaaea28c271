"""Benchmark tasks and `evaluate`, which scores a model with and without an intervention.

Tasks and how each is scored:

- ``arc_challenge``, ``arc_easy``, ``piqa``, ``mmlu``: zero-shot cloze. The prompt is
  ``"Question: ...\\nAnswer:"`` (MMLU adds a line naming the subject) and each choice
  is the continuation ``" " + choice``. ``acc`` picks the choice with the highest
  summed log-likelihood; ``acc_norm`` (primary) divides it by the continuation's
  length in characters.
- ``gsm8k``: the standard 8-shot chain-of-thought prompt, greedy decoding, cut at the
  next ``"Question:"``, ``"\\nQ:"`` or blank line (the exemplars' block separator), the
  first "answer is N" or else the last number, and an exact decimal match against
  ``short_answer``. Also the teacher-forced log-likelihood of the reference chain of
  thought under the same prompt.
- ``math500``: the Minerva 4-shot prompt, greedy decoding cut at the next
  ``"Problem:"`` or after "I hope it is correct.", the last ``\\boxed{}`` (else
  "final answer is $X$") checked with math-verify against the last ``\\boxed{}`` of the
  reference solution. An answer that cannot be extracted is wrong. Also the gold
  solution's log-likelihood.
- ``ifeval``: each prompt through the tokenizer's chat template when it has one,
  greedy decoding, and Google's strict and loose checkers.
- ``perplexity``: the bundled *Moby-Dick* text in rows of 256 tokens.

Validation and test splits are disjoint for every task:

- ARC and MMLU: their official validation and test splits.
- MATH: test is MATH-500; validation is the other 4,500 problems of the MATH test set.
- GSM8K, PIQA and IFEval ship one labelled split each (GSM8K test, PIQA validation,
  IFEval's 541 prompts). Items are ordered by the sha256 of ``"<task>:<item id>"``; the
  first half is ``validation`` and the rest ``test``. The split depends on nothing else,
  so it never changes between runs or seeds.
- perplexity: the first half of the rows is ``validation``, the second half ``test``.

``limit`` then draws a seeded random subset of the split, so a baseline and an
intervention run with the same seed see the same items.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechme.errors import SpecError
from mechme.evaluation import data, scoring, stats

SPLITS = ("validation", "test")
SEQ_LEN = 256
MOBY_DICK = "text/moby-dick.txt"
LN2 = math.log(2)


@dataclass(frozen=True)
class Metric:
    """A metric as ``transform(sum(num) / sum(den))`` over per-item variables.

    Attributes:
        name: metric name as reported.
        num: per-item variable summed in the numerator.
        den: per-item variable summed in the denominator; None counts items.
        transform: applied to the ratio, e.g. ``np.exp`` for perplexity.
        binary: the numerator is 0/1 per item with no denominator, so paired runs are
            compared with McNemar's exact test (else a sign-flip permutation test).
        higher_is_better: direction of improvement.
    """

    name: str
    num: str
    den: str | None = None
    transform: Callable | None = None
    binary: bool = False
    higher_is_better: bool = True


@dataclass(frozen=True)
class Task:
    """A benchmark: where its items come from, how they are scored, what is reported."""

    name: str
    kind: str  # "choice", "generate" or "text"
    metrics: tuple[Metric, ...]
    read: Callable[[str, object], list[dict]] = field(repr=False)
    run: Callable = field(repr=False)
    default_max_new_tokens: int | None = None

    @property
    def primary(self) -> Metric:
        return self.metrics[0]


# -- splits ----------------------------------------------------------------------


def hash_halves(records, task: str, split: str) -> list[dict]:
    """Split records into two fixed halves by the sha256 of ``"<task>:<id>"``."""
    ordered = sorted(records, key=lambda r: hashlib.sha256(f"{task}:{r['id']}".encode()).hexdigest())
    half = len(ordered) // 2
    return ordered[:half] if split == "validation" else ordered[half:]


def _read_arc(subset: str):
    return lambda split, loaded: list(data.read_arc(subset, split))


def _read_mmlu(split, loaded):
    return list(data.read_mmlu(split))


def _read_piqa(split, loaded):
    return hash_halves(data.read_piqa(), "piqa", split)


def _read_gsm8k(split, loaded):
    return hash_halves(data.read_gsm8k(), "gsm8k", split)


def _read_math(split, loaded):
    return list(data.read_math500() if split == "test" else data.read_math_heldout())


def _read_ifeval(split, loaded):
    return hash_halves(data.read_ifeval(), "ifeval", split)


def _read_text(split, loaded):
    from mechme.engine.text import DATA_DIR, read_text_file, tokenize_rows

    _, documents = read_text_file(DATA_DIR / MOBY_DICK)
    rows = tokenize_rows(loaded.tokenizer, "text", documents, seq_len=SEQ_LEN, max_tokens=None)
    records = [{"id": f"row-{i}", "tokens": row} for i, row in enumerate(rows)]
    half = len(records) // 2
    return records[:half] if split == "validation" else records[half:]


# -- runners: each returns per-item variables --------------------------------------


def _encode(tokenizer, text: str, *, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _run_choice(loaded, items, *, batch_size, max_new_tokens, bar) -> dict:
    tokenizer = loaded.tokenizer
    requests = []
    for item in items:
        conts = [_encode(tokenizer, " " + c, special=False) for c in item["choices"]]
        requests.append((_encode(tokenizer, item["prompt"]), conts))
    scores = scoring.score_continuations(loaded, requests, batch_size=batch_size, progress=bar)
    width = max(len(item["choices"]) for item in items)
    logprob = np.full((len(items), width), np.nan)
    out = {"acc": [], "acc_norm": [], "pred": [], "pred_norm": [], "gold": []}
    for row, (item, item_scores) in enumerate(zip(items, scores)):
        raw = np.array([s.logprob for s in item_scores])
        chars = np.array([len(" " + c) for c in item["choices"]])
        logprob[row, :len(raw)] = raw
        pred, pred_norm = int(np.argmax(raw)), int(np.argmax(raw / chars))
        out["pred"].append(pred)
        out["pred_norm"].append(pred_norm)
        out["gold"].append(item["gold"])
        out["acc"].append(float(pred == item["gold"]))
        out["acc_norm"].append(float(pred_norm == item["gold"]))
    out = {k: np.array(v) for k, v in out.items()}
    out["choice_logprob"] = logprob
    return out


def _gold_scores(loaded, prompts, solutions, batch_size, bar) -> dict:
    requests = [(p, [_encode(loaded.tokenizer, s, special=False)]) for p, s in zip(prompts, solutions)]
    scores = scoring.score_continuations(loaded, requests, batch_size=batch_size, progress=bar)
    return {
        "gold_logprob": np.array([s[0].logprob for s in scores]),
        "gold_tokens": np.array([s[0].n_tokens for s in scores], dtype=float),
        "gold_bytes": np.array([len(s.encode("utf-8")) for s in solutions], dtype=float),
    }


GSM8K_STOP = ["Question:", "\nQ:", "\n\n"]
MATH_STOP = ["Problem:", "I hope it is correct."]


def _run_generated(loaded, items, *, batch_size, max_new_tokens, bar, stop, extract, equal, metric, answer_key,
                   solutions) -> dict:
    """Generate from each item's prompt, check the extracted answer, and score the gold solution."""
    prompts = [_encode(loaded.tokenizer, item["prompt"]) for item in items]
    texts = scoring.generate(loaded, prompts, max_new_tokens=max_new_tokens, stop=stop,
                             batch_size=batch_size, progress=bar)
    extracted = [extract(t) for t in texts]
    out = {
        metric: np.array([float(equal(p, item[answer_key])) for p, item in zip(extracted, items)]),
        "generation": np.array(texts, dtype=object),
        "extracted": np.array([p or "" for p in extracted], dtype=object),
        "gold_answer": np.array([item[answer_key] for item in items], dtype=object),
    }
    out.update(_gold_scores(loaded, prompts, solutions, batch_size, bar))
    return out


def _run_gsm8k(loaded, items, **options) -> dict:
    return _run_generated(loaded, items, stop=GSM8K_STOP, extract=scoring.extract_gsm8k, equal=scoring.numbers_equal,
                          metric="exact_match", answer_key="short_answer",
                          solutions=[item["solution"] for item in items], **options)


def _run_math(loaded, items, **options) -> dict:
    return _run_generated(loaded, items, stop=MATH_STOP, extract=scoring.extract_math, equal=scoring.math_equal,
                          metric="accuracy", answer_key="answer",
                          solutions=[" " + item["solution"] for item in items], **options)


def _chat_prompt(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        # The template already writes any BOS it wants.
        return _encode(tokenizer, rendered, special=False)
    return _encode(tokenizer, text)


def _run_ifeval(loaded, items, *, batch_size, max_new_tokens, bar) -> dict:
    checker = scoring.ifeval_checker()
    prompts = [_chat_prompt(loaded.tokenizer, item["prompt"]) for item in items]
    texts = scoring.generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=bar)
    out = {name: [] for name in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose", "n_instructions")}
    for item, text in zip(items, texts):
        example = checker.InputExample(key=item["key"], instruction_id_list=item["instruction_id_list"],
                                       prompt=item["prompt"], kwargs=item["kwargs"])
        # Some checkers draw a random value when an argument is unusable (letter_frequency
        # with letter "#" picks a random letter), so each item gets its own fixed seed.
        with _seeded_random(f"ifeval:{item['key']}"):
            strict = checker.test_instruction_following_strict(example, {item["prompt"]: text})
        with _seeded_random(f"ifeval:{item['key']}"):
            loose = checker.test_instruction_following_loose(example, {item["prompt"]: text})
        out["prompt_strict"].append(float(strict.follow_all_instructions))
        out["prompt_loose"].append(float(loose.follow_all_instructions))
        out["inst_strict"].append(float(sum(strict.follow_instruction_list)))
        out["inst_loose"].append(float(sum(loose.follow_instruction_list)))
        out["n_instructions"].append(float(len(strict.follow_instruction_list)))
    out = {k: np.array(v) for k, v in out.items()}
    out["generation"] = np.array(texts, dtype=object)
    return out


@contextlib.contextmanager
def _seeded_random(key: str):
    state = random.getstate()
    random.seed(key)
    try:
        yield
    finally:
        random.setstate(state)


def _run_text(loaded, items, *, batch_size, max_new_tokens, bar) -> dict:
    rows = [item["tokens"] for item in items]
    scores = scoring.score_rows(loaded, rows, batch_size=batch_size, progress=bar)
    tokenizer = loaded.tokenizer
    return {
        "nll": np.array([-s.logprob for s in scores]),
        "tokens": np.array([s.n_tokens for s in scores], dtype=float),
        # Bytes of the predicted tokens (all but the first of each row).
        "bytes": np.array([len(tokenizer.decode(row[1:]).encode("utf-8")) for row in rows], dtype=float),
    }


def _neg_bits(x):
    return -x / LN2


def _bits(x):
    return x / LN2


_CHOICE_METRICS = (
    Metric("acc_norm", "acc_norm", binary=True),
    Metric("acc", "acc", binary=True),
)

TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "generate", (
        Metric("exact_match", "exact_match", binary=True),
        Metric("gold_loglik_per_token", "gold_logprob", "gold_tokens"),
        Metric("gold_bits_per_byte", "gold_logprob", "gold_bytes", _neg_bits, higher_is_better=False),
    ), _read_gsm8k, _run_gsm8k, default_max_new_tokens=256),
    "math500": Task("math500", "generate", (
        Metric("accuracy", "accuracy", binary=True),
        Metric("gold_loglik_per_token", "gold_logprob", "gold_tokens"),
        Metric("gold_bits_per_byte", "gold_logprob", "gold_bytes", _neg_bits, higher_is_better=False),
    ), _read_math, _run_math, default_max_new_tokens=512),
    "arc_challenge": Task("arc_challenge", "choice", _CHOICE_METRICS, _read_arc("challenge"), _run_choice),
    "arc_easy": Task("arc_easy", "choice", _CHOICE_METRICS, _read_arc("easy"), _run_choice),
    "piqa": Task("piqa", "choice", _CHOICE_METRICS, _read_piqa, _run_choice),
    "mmlu": Task("mmlu", "choice", _CHOICE_METRICS, _read_mmlu, _run_choice),
    "ifeval": Task("ifeval", "generate", (
        Metric("prompt_level_strict", "prompt_strict", binary=True),
        Metric("prompt_level_loose", "prompt_loose", binary=True),
        Metric("inst_level_strict", "inst_strict", "n_instructions"),
        Metric("inst_level_loose", "inst_loose", "n_instructions"),
    ), _read_ifeval, _run_ifeval, default_max_new_tokens=256),
    "perplexity": Task("perplexity", "text", (
        Metric("perplexity", "nll", "tokens", np.exp, higher_is_better=False),
        Metric("bits_per_byte", "nll", "bytes", _bits, higher_is_better=False),
    ), _read_text, _run_text),
}


def get_task(name: str) -> Task:
    """Return the task called ``name``.

    Raises:
        SpecError: the name is unknown; the message lists the valid names.
    """
    if name not in TASKS:
        raise SpecError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def select_items(items: list[dict], limit: int | None, seed: int, *, task: str, split: str) -> list[dict]:
    """Return ``limit`` items drawn at random with ``seed`` (all items when None), in split order."""
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise SpecError(f"limit must be a positive number of items, got {limit!r}")
    if limit > len(items):
        raise SpecError(
            f"limit {limit} is larger than the {split} split of {task}, which has {len(items)} items; "
            f"pass --limit {len(items)} or less"
        )
    chosen = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(chosen)]


# -- evaluate --------------------------------------------------------------------


def evaluate(model, task: str, *, limit: int | None = None, seed: int = 0, intervention=None,
             split: str | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
             progress: bool = True, out: str | Path | None = "runs", exclude=(), resume: bool = True) -> dict:
    """Evaluate a model on a task, and again under an intervention on the same items.

    Args:
        model: a `LoadedModel` or a model reference for `load_model`.
        task: a name in `TASKS`.
        limit: number of items drawn at random (with ``seed``) from the split; None: all.
        seed: seed of the item draw and of the bootstrap and permutation resampling.
        intervention: None, or a zero-argument callable returning a context manager;
            the second pass runs inside ``with intervention():``.
        split: "validation" or "test" (default); the two are disjoint (module docstring).
        max_new_tokens: generation budget for generation tasks (default per task).
        batch_size: items per forward pass or per generation batch.
        progress: show tqdm bars on stderr.
        out: folder for the run file and markdown table; None writes nothing.
        exclude: item ids to leave out before drawing (for example the GSM8K questions a
            fine-tune's training problems were written from).
        resume: return the stored result when ``out`` already contains a run file of the
            same evaluation (same model weights, items, options and intervention).

    Returns:
        A dict with ``task``, ``split``, ``n``, ``metric``, ``score``, ``ci95``, every
        metric under ``metrics``, and ``baseline_score``, ``baseline_ci95`` and
        ``paired_p`` when an intervention is given. ``score`` is the intervention's
        score when there is one, else the baseline's.

    Raises:
        SpecError: an unknown task or split, a bad limit, batch size or token budget.
    """
    from mechme.models.loaded import LoadedModel

    spec_task = get_task(task)
    split = split or "test"
    if split not in SPLITS:
        raise SpecError(f"invalid split {split!r}; choose one of {', '.join(SPLITS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
    if spec_task.kind != "generate" and max_new_tokens is not None:
        raise SpecError(f"max_new_tokens applies to generation tasks only (gsm8k, math500, ifeval), not {task!r}")
    if spec_task.kind == "generate":
        max_new_tokens = spec_task.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise SpecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if intervention is not None and not callable(intervention):
        raise SpecError(f"intervention must be a zero-argument callable returning a context manager, "
                        f"got {type(intervention).__name__}")
    if out is not None:
        from mechme.store.runfile import check_writable

        check_writable(out)

    if not isinstance(model, LoadedModel):
        from mechme.models.loading import load_model

        model = load_model(model)
    exclude = set(exclude)
    items = [item for item in spec_task.read(split, model) if item["id"] not in exclude]
    items = select_items(items, limit, seed, task=task, split=split)

    stored = _stored_result(spec_task, model, items, intervention, split, seed, limit, max_new_tokens,
                            batch_size, out) if (out is not None and resume) else None
    if stored is not None:
        return stored

    started = time.time()
    conditions = {"baseline": _run_condition(spec_task, model, items, None, batch_size, max_new_tokens, progress)}
    if intervention is not None:
        conditions["intervention"] = _run_condition(spec_task, model, items, intervention, batch_size,
                                                    max_new_tokens, progress)
    seconds = time.time() - started

    result = {
        "task": task, "split": split, "n": len(items), "seed": seed, "limit": limit, "model": model.ref,
        "excluded": len(exclude),
        "max_new_tokens": max_new_tokens, "intervention": describe_intervention(intervention),
        "metric": spec_task.primary.name, "higher_is_better": spec_task.primary.higher_is_better,
    }
    result["metrics"] = summarize(spec_task, conditions, seed)
    primary = result["metrics"][spec_task.primary.name]
    result["score"], result["ci95"] = primary["score"], primary["ci95"]
    if intervention is not None:
        result["baseline_score"] = primary["baseline_score"]
        result["baseline_ci95"] = primary["baseline_ci95"]
        result["paired_p"] = primary["paired_p"]
    result["seconds"] = round(seconds, 1)
    if out is not None:
        result["run_file"], result["table_file"] = _write(result, spec_task, model, items, conditions, batch_size, out)
    return result


def _run_condition(task: Task, loaded, items, intervention, batch_size, max_new_tokens, progress) -> dict:
    from tqdm.auto import tqdm

    name = "baseline" if intervention is None else "intervention"
    passes = 2 if task.name in ("gsm8k", "math500") else 1  # generation, then the gold log-likelihood
    bar = tqdm(total=len(items) * passes, desc=f"{task.name} {name}", unit="item", disable=not progress,
               leave=False)
    context = intervention() if intervention is not None else contextlib.nullcontext()
    try:
        with context:
            return task.run(loaded, items, batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar)
    finally:
        bar.close()


def summarize(task: Task, conditions: dict[str, dict], seed: int) -> dict[str, dict]:
    """Compute every metric of ``task`` with its bootstrap CI, and the paired test if two conditions ran."""
    summary = {}
    treated_name = "intervention" if "intervention" in conditions else "baseline"
    for metric in task.metrics:
        per = {}
        for name, values in conditions.items():
            num = values[metric.num]
            den = values[metric.den] if metric.den else None
            per[name] = (num, den)
        num, den = per[treated_name]
        entry = {
            "score": stats.ratio(num, den, metric.transform),
            "ci95": stats.bootstrap_ci(num, den, metric.transform, seed=seed),
            "higher_is_better": metric.higher_is_better,
        }
        if treated_name == "intervention":
            base_num, base_den = per["baseline"]
            entry["baseline_score"] = stats.ratio(base_num, base_den, metric.transform)
            entry["baseline_ci95"] = stats.bootstrap_ci(base_num, base_den, metric.transform, seed=seed)
            if metric.binary:
                entry["paired_p"] = stats.mcnemar_exact(base_num, num)
                entry["paired_test"] = "exact McNemar"
            else:
                entry["paired_p"] = stats.paired_permutation(base_num, num, base_den, den, metric.transform, seed=seed)
                entry["paired_test"] = "paired sign-flip permutation"
        summary[metric.name] = entry
    return summary


def describe_intervention(intervention) -> dict | None:
    """Return a JSON-ready description of an intervention, for the run spec and reports."""
    if intervention is None:
        return None
    description = {"type": type(intervention).__name__}
    spec = getattr(intervention, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        description["spec"] = spec.to_dict()
        for name in ("me_layer", "layers", "k"):
            if hasattr(intervention, name):
                description[name] = getattr(intervention, name)
    else:
        description["name"] = getattr(intervention, "__qualname__", repr(intervention))
    return json.loads(json.dumps(description, default=str))


def _run_spec(task: Task, loaded, items, *, split, seed, limit, max_new_tokens, batch_size, intervention) -> dict:
    """Return what identifies an evaluation: its hash names the run file."""
    ids = [str(item["id"]) for item in items]
    return {
        "kind": "eval", "task": task.name, "split": split, "limit": limit,
        "seed": seed, "items_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "model": loaded.ref, "weights_sha256": loaded.weights_sha256 or "",
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "intervention": intervention,
    }


def _stored_result(task: Task, loaded, items, intervention, split, seed, limit, max_new_tokens, batch_size,
                   out) -> dict | None:
    """Return the result kept in a finished run file of this same evaluation, or None."""
    from mechme.store.runfile import open_run, spec_hash, stored_hash

    spec = _run_spec(task, loaded, items, split=split, seed=seed, limit=limit, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, intervention=describe_intervention(intervention))
    stem = f"eval-{task.name}-{spec_hash(spec)[:12]}"
    path = Path(out) / f"{stem}.h5"
    if not path.exists() or stored_hash(path) != spec_hash(spec):
        return None
    with open_run(path) as ds:
        result = json.loads(ds.attrs["mechme_summary"])
    result.update(run_file=str(path), table_file=str(path.with_suffix(".md")), reused=True)
    return result


def _write(result: dict, task: Task, loaded, items, conditions: dict, batch_size: int, out) -> tuple[str, str]:
    import xarray as xr

    from mechme.store.runfile import spec_hash, write_run

    ids = [str(item["id"]) for item in items]
    spec = _run_spec(task, loaded, items, split=result["split"], seed=result["seed"], limit=result["limit"],
                     max_new_tokens=result["max_new_tokens"], batch_size=batch_size,
                     intervention=result["intervention"])
    names = list(conditions)
    variables = {}
    for key in conditions["baseline"]:
        stacked = np.stack([np.asarray(conditions[name][key]) for name in names])
        dims = ("condition", "item") + (("choice",) if stacked.ndim == 3 else ())
        if stacked.dtype == object:
            stacked = stacked.astype(str)
        variables[key] = (dims, stacked)
    ds = xr.Dataset(variables, coords={"condition": names, "item": ids})
    ds.attrs["mechme_summary"] = json.dumps({k: v for k, v in result.items() if k != "metrics"} |
                                            {"metrics": result["metrics"]}, default=str)
    stem = f"eval-{task.name}-{spec_hash(spec)[:12]}"
    folder = Path(out)
    path = write_run(ds, folder / f"{stem}.h5", kind="eval", spec=spec, model_info=loaded.describe())
    table = folder / f"{stem}.md"
    table.write_text(format_markdown(result) + "\n", encoding="utf-8")
    return str(path), str(table)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _fmt_ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


def format_markdown(result: dict) -> str:
    """Format a result of `evaluate` as a markdown table, one row per metric."""
    lines = [
        f"# eval {result['task']} ({result['split']} split, n={result['n']}, seed {result['seed']})",
        "",
        f"model: {result['model']}; max_new_tokens: {result['max_new_tokens']}; "
        f"intervention: {json.dumps(result['intervention']) if result['intervention'] else 'none'}",
        "",
    ]
    treated = result["intervention"] is not None
    if treated:
        lines += ["| metric | baseline | 95% CI | intervention | 95% CI | paired p | test |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| metric | score | 95% CI |", "|---|---|---|"]
    for name, entry in result["metrics"].items():
        label = f"**{name}**" if name == result["metric"] else name
        if treated:
            lines.append(f"| {label} | {_fmt(entry['baseline_score'])} | {_fmt_ci(entry['baseline_ci95'])} | "
                         f"{_fmt(entry['score'])} | {_fmt_ci(entry['ci95'])} | {_fmt(entry['paired_p'])} | "
                         f"{entry['paired_test']} |")
        else:
            lines.append(f"| {label} | {_fmt(entry['score'])} | {_fmt_ci(entry['ci95'])} |")
    return "\n".join(lines)


def format_result(result: dict) -> str:
    """Format a result of `evaluate` as a plain-text table for the terminal."""
    treated = result["intervention"] is not None
    head = (f"{result['task']} ({result['split']}, n={result['n']}, seed {result['seed']}) on {result['model']}"
            f"{'' if not treated else ' with ' + json.dumps(result['intervention'])}")
    rows = [head, ""]
    if treated:
        rows.append(f"{'metric':24s} {'baseline':>10s} {'intervention':>12s} {'95% CI (interv.)':>22s} {'paired p':>9s}")
    else:
        rows.append(f"{'metric':24s} {'score':>10s} {'95% CI':>22s}")
    for name, entry in result["metrics"].items():
        marker = "*" if name == result["metric"] else " "
        if treated:
            rows.append(f"{marker}{name:23s} {_fmt(entry['baseline_score']):>10s} {_fmt(entry['score']):>12s} "
                        f"{_fmt_ci(entry['ci95']):>22s} {_fmt(entry['paired_p']):>9s}")
        else:
            rows.append(f"{marker}{name:23s} {_fmt(entry['score']):>10s} {_fmt_ci(entry['ci95']):>22s}")
    rows.append("")
    rows.append(f"* primary metric; {result['seconds']} s")
    if result.get("run_file"):
        rows.append(f"run file: {result['run_file']}")
        rows.append(f"table:    {result['table_file']}")
    return "\n".join(rows)
