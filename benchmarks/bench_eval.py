"""Benchmark multiple-choice scoring with shared-prompt reuse against a plain loop.

Three methods score the same ARC-Easy test items (a seeded draw) with the same model,
interleaved per repeat so that machine noise spreads over all of them:

- plain: one forward pass over prompt + choice for every choice, batch size 1, so the
  prompt is recomputed for each choice (`score_unshared`);
- shared-1: `score_continuations` with batch size 1: the prompt runs once with a KV
  cache and all choices are scored from copies of it;
- shared-B: the same with B items per pass (the path `mechme eval` takes).

The script checks that all methods give the same log-likelihoods, then reports items
per second and the speed-up over the plain loop.

Run from the repository root:

    .venv/bin/python benchmarks/bench_eval.py [--items 100] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference passed to load_model")
    parser.add_argument("--items", type=int, default=100, help="ARC-Easy test items to score (default 100)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per pass for shared-B (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per method (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item draw (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from mechme.evaluation import scoring
    from mechme.evaluation.tasks import get_task, select_items
    from mechme.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer = model.tokenizer
    items = select_items(get_task("arc_easy").read("test", model), args.items, args.seed, task="arc_easy",
                         split="test")
    requests = [(tokenizer(item["prompt"]).input_ids,
                 [tokenizer(" " + c, add_special_tokens=False).input_ids for c in item["choices"]])
                for item in items]
    n_choices = sum(len(conts) for _, conts in requests)
    prompt_tokens = sum(len(p) for p, _ in requests)
    choice_tokens = sum(len(c) for _, conts in requests for c in conts)
    log(f"{len(items)} items, {n_choices} choices, {prompt_tokens} prompt tokens, {choice_tokens} choice tokens")

    def plain():
        return [[scoring.score_unshared(model, p, c).logprob for c in conts] for p, conts in requests]

    def shared(batch_size):
        scores = scoring.score_continuations(model, requests, batch_size=batch_size)
        return [[s.logprob for s in item] for item in scores]

    methods = {"plain": plain, "shared-1": lambda: shared(1), f"shared-{args.batch_size}": lambda: shared(args.batch_size)}
    times = {name: [] for name in methods}
    outputs = {}
    shared(args.batch_size)  # warm-up: first-call allocations are not part of the comparison
    for repeat in range(args.repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            outputs[name] = method()
            times[name].append(time.perf_counter() - start)
            log(f"repeat {repeat + 1}: {name:10s} {times[name][-1]:.2f} s")

    reference = outputs["plain"]
    max_diff = max(abs(a - b) for name in methods for ref, got in zip(reference, outputs[name])
                   for a, b in zip(ref, got))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {args.threads} torch threads",
        "model": args.model,
        "items": len(items),
        "choices": n_choices,
        "prompt_tokens": prompt_tokens,
        "choice_tokens": choice_tokens,
        "repeats": args.repeats,
        "max_abs_logprob_diff": max_diff,
        "methods": {
            name: {"median_s": round(median[name], 3), "items_per_s": round(len(items) / median[name], 2),
                   "speedup_vs_plain": round(median["plain"] / median[name], 2)}
            for name in methods
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
