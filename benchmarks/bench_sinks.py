"""Benchmark the streaming attention-sink measure against keeping every attention map.

Two methods compute the same numbers, the Gu et al. importance of the first token for
every prompt, layer and head, on rows of Moby-Dick cut to T tokens:

- mechme: `mechme.measures.sinks.trace_sinks`, which reduces each layer's attention
  to ``[batch, head]`` numbers inside the nnsight trace;
- naive: a plain Hugging Face forward pass with ``output_attentions=True``, which
  returns all ``[layer, batch, head, T, T]`` maps, reduced afterwards.

Each (method, T) pair runs in a fresh child process of this script, so its memory is its
own. A child loads the model with eager attention and reads every weight once. It then
resets the kernel's peak-RSS counter (``VmHWM``, through ``/proc/self/clear_refs``), so
loading does not count. It runs one untimed warm-up pass, times ``--repeats`` passes,
and reports the median time and the peak RSS of the passes. The parent checks that both methods give the same
importances and prints the ratios.

Run from the repository root:

    .venv/bin/python benchmarks/bench_sinks.py [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "data" / "text" / "moby-dick.txt"

# (T, rows per pass): 8 rows of 64 tokens as in Gu et al.'s prompt length, and one row of
# 1,024 tokens, where the naive method keeps 30 x 9 x 1024^2 float32 weights (1.1 GB).
SIZES = ((64, 8), (1024, 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference passed to load_model")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file cut into token rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method and size (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per child (default 1, steadier on a shared machine)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--child", choices=["mechme", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def status_mib(field: str) -> float:
    """Return a memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0 and later).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


# -- child: one method at one size ------------------------------------------------------


def run_child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from mechme.engine.compile import Context
    from mechme.engine.text import make_batches, pad_id, read_text_file, tokenize_rows
    from mechme.measures.sinks import first_token_importance, trace_sinks
    from mechme.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, attn_implementation="eager")
    kind, items = read_text_file(args.text)
    rows = tokenize_rows(model.tokenizer, kind, items, seq_len=args.seq_len, max_tokens=args.seq_len * args.rows)
    batch = make_batches(rows, batch_size=args.rows, pad=pad_id(model.tokenizer))[0]
    real = batch.attention_mask.bool()
    first = torch.tensor(batch.n_pad)
    ctx = Context(model=model)
    strings = [model.tokenizer.convert_ids_to_tokens(r) for r in rows]
    # Weights loaded from safetensors are memory-mapped and page in on first use. Touching
    # them now makes the peak of the passes count activations, not weights.
    with torch.no_grad():
        for param in model.model.parameters():
            param.sum()
    loaded_rss = status_mib("VmRSS")
    reset_peak_rss()

    def mechme_pass():
        return trace_sinks(ctx, [], batch, strings)  # [layer, batch, head]

    def naive_pass():
        with torch.no_grad():
            attentions = model.model(**batch.model_inputs(), output_attentions=True).attentions
        return torch.stack([first_token_importance(a, real, first) for a in attentions]).numpy()

    method = mechme_pass if args.child == "mechme" else naive_pass
    result = method()  # warm-up, untimed
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        method()
        times.append(time.perf_counter() - start)
    return {
        "method": args.child,
        "seq_len": args.seq_len,
        "rows": len(rows),
        "tokens": int(real.sum()),
        "median_s": statistics.median(times),
        "times_s": times,
        "loaded_rss_mib": loaded_rss,
        "peak_rss_mib": status_mib("VmHWM"),
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "importance": np.asarray(result, dtype=float).tolist(),
    }


# -- parent ------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, method: str, seq_len: int, rows: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--seq-len", str(seq_len),
               "--rows", str(rows), "--model", args.model, "--text", args.text, "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at T={seq_len} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    import numpy as np

    results = []
    for seq_len, rows in SIZES:
        runs = {}
        for method in ("mechme", "naive"):
            log(f"{method}: T={seq_len}, {rows} rows, {args.repeats} timed passes")
            runs[method] = spawn(args, method, seq_len, rows)
        diff = float(np.abs(np.array(runs["mechme"]["importance"]) - np.array(runs["naive"]["importance"])).max())
        mech, naive = runs["mechme"], runs["naive"]
        results.append({
            "seq_len": seq_len,
            "rows": mech["rows"],
            "tokens": mech["tokens"],
            "mechme_s": mech["median_s"],
            "naive_s": naive["median_s"],
            "time_ratio": mech["median_s"] / naive["median_s"],
            "mechme_peak_rss_mib": mech["peak_rss_mib"],
            "naive_peak_rss_mib": naive["peak_rss_mib"],
            "peak_rss_ratio": mech["peak_rss_mib"] / naive["peak_rss_mib"],
            "mechme_rss_over_load_mib": mech["peak_rss_mib"] - mech["loaded_rss_mib"],
            "naive_rss_over_load_mib": naive["peak_rss_mib"] - naive["loaded_rss_mib"],
            "max_abs_difference": diff,
            "mechme_times_s": mech["times_s"],
            "naive_times_s": naive["times_s"],
        })

    header = ("| T | rows | mechme s | naive s | time ratio | mechme peak RSS MiB | naive peak RSS MiB "
              "| RSS ratio | above load: mechme / naive MiB | max abs diff |")
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r['seq_len']} | {r['rows']} | {r['mechme_s']:.3f} | {r['naive_s']:.3f} | {r['time_ratio']:.2f} "
            f"| {r['mechme_peak_rss_mib']:.0f} | {r['naive_peak_rss_mib']:.0f} | {r['peak_rss_ratio']:.2f} "
            f"| {r['mechme_rss_over_load_mib']:.0f} / {r['naive_rss_over_load_mib']:.0f} "
            f"| {r['max_abs_difference']:.1e} |"
        )
    print("\n".join(lines))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    print(f"\nmachine: {machine}; torch threads per child: {args.threads}; model: {args.model}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "threads": args.threads, "model": args.model, "repeats": args.repeats,
            "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
