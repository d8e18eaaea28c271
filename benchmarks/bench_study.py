"""Benchmark: a study of 8 conditions against the same edits as plain torch forward hooks.

Both sides run the baseline and 8 conditions over the same batches of SmolLM2 in one
process, under torch.no_grad, and compute the same per-condition numbers (KL against the
baseline and the top |activation| at the ME Layer). The ratio mechme / hooks is the
overhead of compiling specs into nnsight traces. Repeats are interleaved and the
median is reported.

    .venv/bin/python benchmarks/bench_study.py [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from tqdm.auto import tqdm

from mechme.engine.compile import Context, compile_condition
from mechme.engine.study import BASELINE, _run_batch
from mechme.engine.text import make_batches, pad_id, tokenize_rows
from mechme.models import load_model
from mechme.specs import Condition, Dims, Intervention, Scale, Study, Tokens, Zero

ME = 11


def conditions() -> list[Condition]:
    return [
        Condition(name=f"zero_mlp_{layer}", interventions=[Intervention(site="mlp_out", layers=layer, op=Zero())])
        for layer in (9, 10, 11, 12)
    ] + [
        Condition(name=f"scale_resid_{layer}", interventions=[
            Intervention(site="resid_post", layers=layer, op=Scale(factor=0.5), tokens=Tokens.all(),
                         dims=Dims.of(507, 247))])
        for layer in (11, 12, 13, 14)
    ]


def hook_for(condition: Condition, batch):
    iv = condition.interventions[0]
    rows = torch.arange(len(batch.n_pad))
    first = torch.tensor(batch.n_pad)
    real = batch.attention_mask.bool().unsqueeze(-1)
    if isinstance(iv.op, Zero):
        def hook(module, args, output):
            output = output.clone()
            output[rows, first] = 0
            return output
        return "mlp", iv.layers[0], hook

    def hook(module, args, output):
        output = output.clone()
        dims = list(iv.dims.dims)
        output[..., dims] = torch.where(real, output[..., dims] * iv.op.factor, output[..., dims])
        return output
    return "", iv.layers[0], hook


def run_hooks(model, batches, conds):
    results = []
    for batch in batches:
        real = batch.attention_mask.bool()
        captured = {}

        def grab(module, args, output):
            captured["me"] = output.detach().abs().amax()

        handle = model.layer_module(ME).register_forward_hook(grab)
        with torch.no_grad():
            base = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
            for cond in conds:
                path, layer, hook = hook_for(cond, batch)
                h = model.submodule(layer, path).register_forward_hook(hook)
                lp = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
                h.remove()
                kl = (base.exp() * (base - lp)).sum(-1)[real].mean()
                results.append((float(kl), float(captured["me"])))
        handle.remove()
    return results


def run_mechme(model, batches, conds, strings, stack_tokens=4096):
    """Run the study engine's per-batch path: the baseline, then the conditions, stacked per trace."""
    study = Study(name="bench", conditions=tuple(conds))
    ctx = Context(model=model, me_layer=ME, massive_dims=(507, 247))
    compiled = {c.name: compile_condition(c, ctx) for c in (BASELINE, *conds)}
    results = []
    bar = tqdm(disable=True)
    for batch in batches:
        rows = [strings[i] for i in batch.prompt_ids]
        part = _run_batch(study, ctx, compiled, batch, rows, bar, stack_tokens)
        for cond in conds:
            results.append((float(part[f"{cond.name}/kl_sum"].sum()), float(abs(part[f"{cond.name}/me_top"]).max())))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_model("smollm2-135m")
    rows = tokenize_rows(model.tokenizer, "text", [open("data/text/moby-dick.txt").read()],
                         seq_len=args.seq_len, max_tokens=args.seq_len * 16)
    batches = make_batches(rows, batch_size=8, pad=pad_id(model.tokenizer))
    strings = [model.tokenizer.convert_ids_to_tokens(r) for r in rows]
    conds = conditions()
    run_hooks(model, batches[:1], conds[:1])  # warm-up
    run_mechme(model, batches[:1], conds[:1], strings)

    runs = {
        "hooks": lambda: run_hooks(model, batches, conds),
        "mechme": lambda: run_mechme(model, batches, conds, strings),
        "mechme_one_per_trace": lambda: run_mechme(model, batches, conds, strings, stack_tokens=1),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    hooks = median["hooks"]
    result = {"machine": platform.processor() or platform.machine(), "threads": 2, "batches": len(batches),
              "tokens": sum(len(r) for r in rows), "conditions": len(conds), "seconds": median,
              "ratio": median["mechme"] / hooks, "ratio_one_per_trace": median["mechme_one_per_trace"] / hooks,
              "all_times": times}
    print(f"| study of {len(conds)} conditions + baseline | seconds (median of {args.repeats}) | ratio |")
    print("|---|---|---|")
    print(f"| plain torch forward hooks | {hooks:.2f} | 1.000 |")
    print(f"| mechme study engine, conditions stacked | {median['mechme']:.2f} | {result['ratio']:.3f} |")
    print(f"| mechme study engine, one trace per condition | {median['mechme_one_per_trace']:.2f} | "
          f"{result['ratio_one_per_trace']:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
