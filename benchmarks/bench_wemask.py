"""Benchmark: WeMask's overhead in generation, masked against unmasked, per generated token.

Greedy generation of 64 new tokens from 8 prompts on SmolLM2 with the KV cache, with and
without WeMask (its default rule: the massive token's attention input, prefill only),
interleaved, median of the repeats. The target is at most 3% extra time per token.

    .venv/bin/python benchmarks/bench_wemask.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mechme.engine.text import load_prompt_set
from mechme.mitigation.wemask import WeMask, WeMaskSpec
from mechme.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    enc = model.tokenizer(load_prompt_set("sentences")[:8], return_tensors="pt", padding=True)
    masks = {
        "activation k=2 (prefill)": WeMask(model, WeMaskSpec(dims="activation", k=2, me_layer=11)),
        "gain k=4 (prefill)": WeMask(model, WeMaskSpec(dims="gain", k=4, me_layer=11)),
        "activation k=2, released (every step)": WeMask(model, WeMaskSpec(dims="activation", k=2, me_layer=11,
                                                                          token="released")),
    }

    def generate():
        with torch.no_grad():
            out = model.model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        return out.shape[1] - enc.input_ids.shape[1]

    generate()  # warm-up
    times = {"unmasked": [], **{name: [] for name in masks}}
    for _ in range(args.repeats):
        for name in times:
            start = time.perf_counter()
            if name == "unmasked":
                n = generate()
            else:
                with masks[name]:
                    n = generate()
            times[name].append((time.perf_counter() - start) / n)
    base = statistics.median(times["unmasked"])
    print(f"| setting | ms per generated token (batch 8, median of {args.repeats}) | ratio to unmasked |")
    print("|---|---|---|")
    result = {}
    for name, values in times.items():
        t = statistics.median(values)
        result[name] = {"ms_per_token": 1000 * t, "ratio": t / base}
        print(f"| {name} | {1000 * t:.1f} | {t / base:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": result, "times": times}, fh, indent=2)


if __name__ == "__main__":
    main()
