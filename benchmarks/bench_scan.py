"""Benchmark the streaming scan against a plain forward pass and a keep-everything scan.

The timed methods run over the same token batches in one process, one after the other
in each repeat, so that machine noise spreads over all of them:

- baseline: a plain Hugging Face forward pass with ``output_hidden_states=True``.
- mechme trace_batch: ``trace_batch`` per batch, the scan's per-batch work without
  disk I/O.
- mechme scan() end to end: ``scan(...)`` with tokenization, run file and figure.
- naive keep-all: the baseline forward, with a CPU copy of every hidden state kept
  until all batches are done, then per-layer top-1 |a| and median |a| computed from them.
- reduce_layer alone: the scan's reduction on stored hidden states with no forward
  pass, which shows how much of the scan's extra time is its own arithmetic.

Peak memory (peak RSS, ``VmHWM``) of a full scan and of the naive method is measured
at N and 10 x N tokens, each in a fresh child process of this script (``--child``).

Run from the repository root:

    .venv/bin/python benchmarks/bench_scan.py [--quick] [--json PATH]
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "data" / "text" / "moby-dick.txt"

# The default sizes took 9.5 minutes on an idle 2-core AMD EPYC (docs/benchmarks.md).
# --quick shrinks every size.
DEFAULTS = {"timing_tokens": 4096, "repeats": 5, "memory_tokens": 4096, "memory_repeats": 2}
QUICK = {"timing_tokens": 2048, "repeats": 2, "memory_tokens": 2048, "memory_repeats": 1}

# A pass during which other processes used more than this share of all cores counts
# as disturbed in the report.
BUSY_SHARE = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    # What is scanned, as in a default scan of the bundled text.
    parser.add_argument("--model", default="smollm2-135m", help="model reference passed to load_model")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file cut into token rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")

    # Sizes of the two parts. --quick changes the defaults of the ones left unset.
    parser.add_argument("--timing-tokens", type=int, help="tokens per timed pass (default 4096, or 2048 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed passes per method (default 5, or 2 with --quick)")
    parser.add_argument(
        "--memory-tokens", type=int,
        help="token count N of the smaller memory run (default 4096, or 2048 with --quick)",
    )
    parser.add_argument(
        "--memory-scale", type=int, default=10,
        help="the larger memory run uses N times this many tokens (default 10)",
    )
    parser.add_argument(
        "--memory-repeats", type=int,
        help="fresh processes per size for the scan's memory runs (default 2, or 1 with --quick)",
    )

    parser.add_argument("--skip-memory", action="store_true", help="run only the timing part")
    parser.add_argument("--skip-timing", action="store_true", help="run only the memory part")
    parser.add_argument("--quick", action="store_true", help="short run with small sizes, for a smoke check")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")

    # Internal: one memory run in a fresh process.
    parser.add_argument("--child", choices=["scan", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("seq_len", "batch_size", "threads", "timing_tokens", "repeats", "memory_tokens", "memory_scale",
                "memory_repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_busy_seconds() -> float:
    """Return the CPU seconds all processes have used since boot, from /proc/stat (Linux only)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# -- shared set-up -------------------------------------------------------------------


def setup(args: argparse.Namespace, tokens: int):
    """Load the model and cut ``tokens`` tokens of the text into the scan's batches."""
    import torch

    torch.set_num_threads(args.threads)
    from mechme.engine.scan import ScanSpec, resolve_rows
    from mechme.engine.text import make_batches, pad_id
    from mechme.models import load_model

    loaded = load_model(args.model, dtype="float32")
    spec = ScanSpec(
        model=args.model, text=args.text, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=tokens,
    )
    # The same calls as scan(), so every method runs on the batches that scan() builds.
    _, _, rows = resolve_rows(spec, loaded.tokenizer)
    batches = make_batches(rows, batch_size=spec.batch_size, pad=pad_id(loaded.tokenizer))
    return loaded, spec, batches


def proc_status_mib(field: str) -> float:
    """Return a memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB, on Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status; the memory benchmark needs Linux")


def ru_maxrss_mib() -> float:
    # On Linux ru_maxrss is in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the timed methods ---------------------------------------------------------------


def run_baseline(loaded, batches) -> None:
    import torch

    with torch.no_grad():
        for batch in batches:
            loaded.model(**batch.model_inputs(), output_hidden_states=True)


def run_mechme(loaded, batches, spec) -> None:
    import torch

    from mechme.engine.scan import trace_batch

    with torch.no_grad():
        for batch in batches:
            trace_batch(loaded, batch, spec)


def run_reduce_only(batches, hidden_states, spec) -> None:
    """Run the scan's per-layer reduction on stored hidden states, with no forward pass."""
    import torch

    from mechme.measures import massive

    with torch.no_grad():
        for batch, states in zip(batches, hidden_states):
            real = batch.attention_mask.bool()
            for h in states:
                massive.reduce_layer(h, real, batch.n_pad, spec.abs_threshold, spec.ratio_threshold)


def run_full_scan(loaded, spec, out: Path):
    from mechme.engine.scan import scan

    return scan(spec, model=loaded, out=out, progress=False, resume=False)


def run_naive(loaded, batches) -> list[dict]:
    """Keep a CPU copy of every hidden state, then reduce them all at the end."""
    import torch

    saved_states = []
    with torch.no_grad():
        for batch in batches:
            out = loaded.model(**batch.model_inputs(), output_hidden_states=True)
            saved_states.append([h.detach().to("cpu", copy=True) for h in out.hidden_states])
        return naive_stats(saved_states, [p for batch in batches for p in batch.n_pad])


def naive_stats(saved_states: list[list], n_pad: list[int]) -> list[dict]:
    """Return per-prompt top-1 |a| and median |a|, and the pooled median, per hidden state.

    ``saved_states[batch][state]`` is a ``[rows, seq, dim]`` tensor. Hidden state 0 is
    the embedding output, like the scan's ``input`` statistics. In transformers 5.25 the
    last one comes after the model's final norm, so its values differ from the scan's
    last ``resid_post``, but the work is the same.
    """
    import torch

    stats = []
    for index in range(len(saved_states[0])):
        top1, median, real_entries = [], [], []
        row = 0
        for states in saved_states:
            h = states[index].abs()
            pads = n_pad[row:row + h.shape[0]]
            row += h.shape[0]
            if any(pads):
                # Left padding: each row's real entries start after its own pad count.
                for b, p in enumerate(pads):
                    entries = h[b, p:].reshape(-1)
                    top1.append(entries.max().reshape(1))
                    median.append(entries.median().reshape(1))
                    real_entries.append(entries)
            else:
                flat = h.reshape(h.shape[0], -1)
                top1.append(flat.amax(dim=1))
                median.append(flat.median(dim=1).values)
                real_entries.append(flat.reshape(-1))
        stats.append({
            "top1": torch.cat(top1).numpy(),
            "median": torch.cat(median).numpy(),
            "pooled_median": float(torch.cat(real_entries).median()),
        })
    return stats


# -- timing --------------------------------------------------------------------------


def time_methods(args: argparse.Namespace) -> dict:
    import torch

    loaded, spec, batches = setup(args, args.timing_tokens)
    n_tokens = sum(sum(batch.lengths) for batch in batches)
    log(f"timing: {len(batches)} batch(es), {n_tokens} tokens per pass, {args.repeats} repeat(s)")

    # The n_layers + 1 hidden states match the scan's reduce_layer calls (the layer-0
    # input, then every layer's output), so this row isolates the scan's own arithmetic.
    with torch.no_grad():
        hidden_states = [loaded.model(**b.model_inputs(), output_hidden_states=True).hidden_states for b in batches]
    methods = {
        "baseline": lambda out: run_baseline(loaded, batches),
        "mechme trace_batch": lambda out: run_mechme(loaded, batches, spec),
        "mechme scan() end to end": lambda out: run_full_scan(loaded, spec, out),
        "naive keep-all": lambda out: run_naive(loaded, batches),
        "reduce_layer alone, no forward": lambda out: run_reduce_only(batches, hidden_states, spec),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    # CPU seconds of this process (all threads) next to wall seconds, because time
    # spent waiting for a core while other programs run counts in wall time only.
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    # Share of the machine's cores that other processes used during each pass.
    other_load: dict[str, list[float]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(prefix="mechme-bench-") as tmp:
        # One untimed pass each, because the first nnsight trace and the first forward
        # take longer than later ones, and a long scan spreads that over many batches.
        for name, method in methods.items():
            log(f"  warm-up: {name}")
            method(Path(tmp) / "warmup")
        for repeat in range(args.repeats):
            for name, method in methods.items():
                # A fresh folder per call, because scan() never overwrites a run file.
                out = Path(tmp) / f"{repeat}-{len(times[name])}"
                start, cpu_start, busy_start = time.perf_counter(), time.process_time(), machine_busy_seconds()
                method(out)
                wall = time.perf_counter() - start
                cpu = time.process_time() - cpu_start
                times[name].append(wall)
                cpu_times[name].append(cpu)
                other_load[name].append(max(0.0, machine_busy_seconds() - busy_start - cpu) / (wall * os.cpu_count()))
            summary = ", ".join(f"{name} {values[-1]:.2f}s" for name, values in times.items())
            log(f"  repeat {repeat + 1}/{args.repeats}: {summary}")

    base = statistics.median(times["baseline"])
    cpu_base = statistics.median(cpu_times["baseline"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        cpu_median = statistics.median(cpu_times[name])
        rows.append({
            "method": name,
            "median_s": median,
            "min_s": min(values),
            "max_s": max(values),
            "tokens_per_s": n_tokens / median,
            "ratio_to_baseline": median / base,
            # Other load only ever adds time, so on a busy machine the fastest pass
            # is the one closest to the time on an idle machine.
            "min_ratio_to_baseline": min(values) / min(times["baseline"]),
            "cpu_median_s": cpu_median,
            "cpu_ratio_to_baseline": cpu_median / cpu_base,
            # Each pass divided by the baseline pass of the same repeat, which ran just
            # before it under much the same load, so slow drifts in load cancel out.
            "paired_ratio_median": statistics.median(
                value / baseline for value, baseline in zip(values, times["baseline"])
            ),
            "times_s": values,
            "cpu_times_s": cpu_times[name],
            "other_load_share": other_load[name],
            "busy_passes": sum(share > BUSY_SHARE for share in other_load[name]),
        })
    return {
        "tokens_per_pass": n_tokens,
        "batches_per_pass": len(batches),
        "repeats": args.repeats,
        "rows": rows,
        "model_shape": {"n_layers": loaded.n_layers, "d_model": loaded.d_model},
    }


# -- memory --------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> None:
    """Run one method at ``--tokens`` tokens and print its memory use as one JSON line."""
    import torch

    loaded, spec, batches = setup(args, args.tokens)
    # Right after load_model the weights are not all resident (RSS grows by about
    # 500 MiB on their first read), so read them all before taking the baseline RSS.
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.sum()
    resident = proc_status_mib("VmRSS")
    start = time.perf_counter()
    if args.child == "scan":
        with tempfile.TemporaryDirectory(prefix="mechme-bench-") as tmp:
            run_full_scan(loaded, spec, Path(tmp))
    else:
        run_naive(loaded, batches)
    result = {
        "method": args.child,
        "tokens": sum(sum(batch.lengths) for batch in batches),
        "rss_model_resident_mib": resident,
        # VmHWM is the peak RSS of this process's own address space. ru_maxrss is kept
        # for reference only, because it can report the benchmark parent's peak instead.
        # CPython 3.10+ starts children with vfork, and on Linux (checked on 6.18) the
        # child's ru_maxrss then starts at the parent's peak.
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "ru_maxrss_mib": ru_maxrss_mib(),
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(result), flush=True)


def read_model_shape(args: argparse.Namespace) -> dict:
    from mechme.models import load_model

    loaded = load_model(args.model, dtype="float32")
    return {"n_layers": loaded.n_layers, "d_model": loaded.d_model}


def naive_bytes_estimate(model_shape: dict, tokens: int) -> int:
    """Estimate the bytes the naive method keeps: every hidden state, in float32."""
    return (model_shape["n_layers"] + 1) * tokens * model_shape["d_model"] * 4


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo; the memory benchmark needs Linux")


def run_child(args: argparse.Namespace, method: str, tokens: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", method, "--tokens", str(tokens),
        "--model", args.model, "--text", args.text, "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
    ]
    log(f"memory: {method} at {tokens} tokens (fresh process)")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {method} at {tokens} tokens failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace, model_shape: dict) -> dict:
    """Measure peak RSS of the scan and the naive method at N and ``memory_scale`` x N tokens."""
    small = args.memory_tokens
    large = small * args.memory_scale
    results = {"small_tokens": small, "large_tokens": large, "runs": [], "skipped": []}
    if small < args.batch_size * args.seq_len:
        # Peak memory follows the size of one batch, so a smaller first run compares
        # partial batches with full ones and overstates the growth.
        log(f"warning: --memory-tokens {small} is less than one full batch "
            f"({args.batch_size} x {args.seq_len} tokens), so the two sizes use batches of different sizes")

    # The scan's peak is set by the transients of the first batches, and it differed by
    # up to 25% between identical processes (1,622 to 2,025 MiB at 4,096 tokens), more
    # than the 10% target. Repeating the runs and comparing medians reduces that noise
    # but does not remove it. The naive method grows far more, so one run per size is
    # enough.
    for _ in range(args.memory_repeats):
        for tokens in (small, large):
            results["runs"].append(measured_child(args, "scan", tokens))

    for tokens in (small, large):
        estimate_mib = naive_bytes_estimate(model_shape, tokens) / 2**20
        # Half of the available memory leaves room for the model, the concatenation in
        # naive_stats and whatever else runs on the machine.
        if estimate_mib > 0.5 * available_mib():
            reason = (
                f"estimated {estimate_mib:.0f} MiB of hidden states exceed half of the "
                f"{available_mib():.0f} MiB available"
            )
            results["skipped"].append(
                {"method": "naive", "tokens": tokens, "estimated_hidden_states_mib": estimate_mib, "reason": reason}
            )
            log(f"  skipped: {reason}")
            continue
        run = measured_child(args, "naive", tokens)
        run["estimated_hidden_states_mib"] = estimate_mib
        results["runs"].append(run)

    for method in ("scan", "naive"):
        peaks = {
            size: [run["peak_rss_mib"] for run in results["runs"]
                   if run["method"] == method and run["requested_tokens"] == size]
            for size in (small, large)
        }
        if not (peaks[small] and peaks[large]):
            continue
        growth = {
            size: [run["peak_rss_mib"] - run["rss_model_resident_mib"] for run in results["runs"]
                   if run["method"] == method and run["requested_tokens"] == size]
            for size in (small, large)
        }
        results[method] = {
            "median_peak_mib": [statistics.median(peaks[small]), statistics.median(peaks[large])],
            "median_growth_mib": [statistics.median(growth[small]), statistics.median(growth[large])],
            "peak_ratio": statistics.median(peaks[large]) / statistics.median(peaks[small]),
        }
    return results


def measured_child(args: argparse.Namespace, method: str, tokens: int) -> dict:
    run = run_child(args, method, tokens)
    run["requested_tokens"] = tokens
    log(f"  peak RSS {run['peak_rss_mib']:.0f} MiB (model resident {run['rss_model_resident_mib']:.0f} MiB)")
    return run


# -- report --------------------------------------------------------------------------


def machine_info() -> dict:
    import nnsight
    import torch
    import transformers

    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    total_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(total_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": nnsight.__version__,
        "gpu": torch.cuda.is_available(),
    }


def markdown(results: dict) -> str:
    lines = []
    timing = results.get("timing")
    if timing:
        lines += timing_markdown(results, timing)
    memory = results.get("memory")
    if memory:
        lines += memory_markdown(memory)
    return "\n".join(lines)


def timing_markdown(results: dict, timing: dict) -> list[str]:
    args = results["args"]
    lines = [
        f"Timing: {timing['tokens_per_pass']} tokens per pass ({timing['batches_per_pass']} batch(es) of up to "
        f"{args['batch_size']} x {args['seq_len']} tokens), {timing['repeats']} interleaved repeats, "
        f"{args['threads']} threads. Load average (1 min) {results['load_average_start'][0]:.2f} at the start, "
        f"{results['load_average_end'][0]:.2f} at the end.",
        "",
        "Ratios are to the baseline: of the medians, of the fastest passes, the median of each pass over "
        "the baseline pass of its repeat (paired), and of the median CPU seconds of the process. "
        f"'Disturbed' counts the passes during which other processes used more than {BUSY_SHARE:.0%} of "
        "the cores.",
        "",
        "| method | median s | min s | max s | ratio of medians | ratio of mins | paired ratio | CPU ratio "
        "| disturbed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in timing["rows"]:
        lines.append(
            f"| {row['method']} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} "
            f"| {row['ratio_to_baseline']:.3f} | {row['min_ratio_to_baseline']:.3f} "
            f"| {row['paired_ratio_median']:.3f} | {row['cpu_ratio_to_baseline']:.3f} "
            f"| {row['busy_passes']}/{len(row['times_s'])} |"
        )
    return lines


def memory_markdown(memory: dict) -> list[str]:
    lines = [
        "",
        "Peak RSS (VmHWM) of one fresh process per row. 'Model resident' is the RSS after "
        "loading the model, reading all its weights once and tokenizing the text. 'Growth' is "
        "the peak minus that.",
        "",
        "| method | tokens | model resident MiB | peak MiB | growth MiB | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in memory["runs"]:
        lines.append(
            f"| {run['method']} | {run['tokens']} | {run['rss_model_resident_mib']:.0f} "
            f"| {run['peak_rss_mib']:.0f} | {run['peak_rss_mib'] - run['rss_model_resident_mib']:.0f} "
            f"| {run['seconds']:.1f} |"
        )
    for skipped in memory["skipped"]:
        lines.append(f"| {skipped['method']} | {skipped['tokens']} | skipped: {skipped['reason']} | | | |")
    lines.append("")
    for method in ("scan", "naive"):
        if method in memory:
            summary = memory[method]
            low, high = summary["median_peak_mib"]
            growth_low, growth_high = summary["median_growth_mib"]
            lines.append(
                f"- {method}: median peak {low:.0f} MiB at {memory['small_tokens']} tokens, {high:.0f} MiB at "
                f"{memory['large_tokens']} tokens, ratio {summary['peak_ratio']:.3f}; growth over the resident "
                f"model {growth_low:.0f} -> {growth_high:.0f} MiB"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        if args.tokens is None:
            raise SystemExit("--child requires --tokens")
        child_main(args)
        return

    started = time.perf_counter()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "args": {key: value for key, value in vars(args).items() if key not in ("child", "tokens")},
    }
    if args.skip_timing and args.skip_memory:
        raise SystemExit("--skip-timing and --skip-memory together leave nothing to run; drop one of them")
    if not args.skip_timing:
        results["timing"] = time_methods(args)
    if not args.skip_memory:
        results["memory"] = measure_memory(args, read_model_shape(args))
    results["load_average_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started

    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
