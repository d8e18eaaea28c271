"""Benchmark activation capture against a plain forward pass and a plain h5py write.

Three measurements on one model and text, in one process unless stated:

- throughput: ``capture()`` of resid_post at the first token of every layer (the
  massive token), end to end into a fresh folder. The baselines are a plain Hugging
  Face forward over the same batches and the decoder stack alone (``model.model``, no
  LM head). A capture of all tokens (uncompressed) shows the cost of moving every state
  to the file. Methods are interleaved per repeat so machine noise spreads over them.
- write rate: ``capture()`` of resid_post at all tokens of every layer, with the trace
  replaced by a lookup of values captured beforehand, so only planning and the HDF5
  writes (chunked, gzip, Fletcher-32) are timed. The baseline writes the same
  ``[token, layer, dim]`` array with one plain ``h5py`` ``create_dataset(data=...)``
  call (contiguous, uncompressed) into the same folder. Neither calls fsync, so both
  rates include the page cache.
- peak memory: ``ru_maxrss`` of a fresh child process that captures resid_post at all
  tokens of every layer, at N and 10 x N tokens.

Run from the repository root:

    .venv/bin/python benchmarks/bench_capture.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "data" / "text" / "moby-dick.txt"

# --quick shrinks every size, for a smoke check.
DEFAULTS = {"timing_tokens": 4096, "repeats": 3, "write_tokens": 4096, "memory_tokens": 2048}
QUICK = {"timing_tokens": 2048, "repeats": 2, "write_tokens": 2048, "memory_tokens": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference passed to load_model")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file cut into token rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--timing-tokens", type=int, help="tokens per timed pass (default 4096; --quick: 2048)")
    parser.add_argument("--repeats", type=int, help="timed passes per method (default 3; --quick: 2)")
    parser.add_argument("--write-tokens", type=int, help="tokens in the write-rate test (default 4096; --quick: 2048)")
    parser.add_argument("--memory-tokens", type=int, help="smaller token count N of the memory runs (default 2048)")
    parser.add_argument("--memory-scale", type=int, default=10, help="the larger memory run uses N times this (10)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--quick", action="store_true", help="short run with small sizes, for a smoke check")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def setup(args: argparse.Namespace, tokens: int):
    """Load the model and build the capture's batches for ``tokens`` tokens of the text."""
    import torch

    torch.set_num_threads(args.threads)
    from mechme.engine.capture import CaptureSpec, plan_capture
    from mechme.models import load_model

    loaded = load_model(args.model, dtype="float32")
    spec = CaptureSpec(
        model=args.model, sites=("resid_post",), tokens="first", text=args.text, seq_len=args.seq_len,
        batch_size=args.batch_size, max_tokens=tokens,
    )
    # plan_capture builds the batches exactly as capture() does.
    plan = plan_capture(spec, loaded)
    return loaded, spec, plan


def peak_rss_mib() -> float:
    # On Linux ru_maxrss is in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in MiB (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status; the memory benchmark needs Linux")


def current_rss_mib() -> float:
    return status_mib("VmRSS")


# -- throughput ----------------------------------------------------------------------


def time_throughput(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from mechme.engine.capture import capture

    loaded, spec, plan = setup(args, args.timing_tokens)
    n_tokens = sum(sum(batch.lengths) for batch in plan.batches)
    log(f"throughput: {len(plan.batches)} batch(es), {n_tokens} tokens per pass, {args.repeats} repeat(s)")

    def plain_forward(out):
        with torch.no_grad():
            for batch in plan.batches:
                loaded.model(**batch.model_inputs())

    def decoder_only(out):
        with torch.no_grad():
            for batch in plan.batches:
                loaded.model.model(**batch.model_inputs())

    def capture_first(out):
        capture(loaded, spec, out=out, progress=False, resume=False)

    def capture_all(out):
        capture(loaded, spec, tokens="all", compression="none", out=out, progress=False, resume=False)

    methods = {
        "plain forward (with LM head)": plain_forward,
        "decoder stack only (no LM head)": decoder_only,
        f"capture() resid_post, first token, {loaded.n_layers} layers": capture_first,
        f"capture() resid_post, all tokens, {loaded.n_layers} layers, no compression": capture_all,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    # One untimed pass each pays one-off costs (first trace, allocator growth).
    for name, method in methods.items():
        log(f"  warm-up: {name}")
        method(tmp / "warmup")
    for repeat in range(args.repeats):
        for name, method in methods.items():
            out = tmp / f"throughput-{repeat}"
            start = time.perf_counter()
            method(out)
            times[name].append(time.perf_counter() - start)
        log(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()))

    base = statistics.median(times["plain forward (with LM head)"])
    decoder = statistics.median(times["decoder stack only (no LM head)"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({
            "method": name, "median_s": median, "min_s": min(values), "max_s": max(values),
            "tokens_per_s": n_tokens / median, "ratio_to_plain_forward": median / base,
            "ratio_to_decoder_only": median / decoder, "times_s": values,
        })
    return {"tokens_per_pass": n_tokens, "batches_per_pass": len(plan.batches), "repeats": args.repeats, "rows": rows}


# -- write rate ----------------------------------------------------------------------


def time_writes(args: argparse.Namespace, tmp: Path) -> dict:
    import dataclasses

    import h5py
    import numpy as np

    from mechme.engine import capture as capture_module
    from mechme.engine.capture import capture, open_capture

    loaded, spec, _ = setup(args, args.write_tokens)
    spec = dataclasses.replace(spec, tokens="all")
    log(f"write rate: capturing resid_post at all {args.write_tokens} tokens once, for the values")
    source = capture(loaded, spec, out=tmp / "write-source", progress=False, resume=False)
    with open_capture(source) as ds:
        values = ds.resid_post.values  # [token, layer, dim] float32
    n_bytes = values.nbytes
    real_trace = capture_module.trace_batch

    def replay(model, batch, picks, pairs):
        # Serve the values captured above, in batch order, instead of running the model.
        start = replay.row
        replay.row += len(picks)
        return {"resid_post": values[start:replay.row]}

    def mechme_write(compression):
        def write(out):
            replay.row = 0
            capture_module.trace_batch = replay
            try:
                return capture(loaded, spec, compression=compression, out=out, progress=False, resume=False)
            finally:
                capture_module.trace_batch = real_trace

        return write

    def plain_write(out):
        out.mkdir(parents=True, exist_ok=True)
        path = out / "plain.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("resid_post", data=values)
        return path

    methods = {
        "plain h5py write": plain_write,
        "capture() write path, gzip (default)": mechme_write("gzip"),
        "capture() write path, compression none": mechme_write("none"),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    sizes: dict[str, int] = {}
    for repeat in range(args.repeats):
        for number, (name, method) in enumerate(methods.items()):
            start = time.perf_counter()
            path = method(tmp / f"write-{repeat}-{number}")
            times[name].append(time.perf_counter() - start)
            sizes[name] = path.stat().st_size
            # A file without the same values would make the timing meaningless; the
            # check is not timed.
            with h5py.File(path, "r") as fh:
                np.testing.assert_array_equal(fh["resid_post"][()], values)
            path.unlink()
        log(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()))

    base = statistics.median(times["plain h5py write"])
    rows = []
    for name, values_s in times.items():
        median = statistics.median(values_s)
        rows.append({
            "method": name, "median_s": median, "mib_per_s": n_bytes / 2**20 / median,
            "ratio_to_plain": median / base, "file_mib": sizes[name] / 2**20, "times_s": values_s,
        })
    return {"array_shape": list(values.shape), "array_mib": n_bytes / 2**20, "rows": rows}


# -- memory --------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> None:
    """Capture resid_post at all tokens of every layer and print memory use as one JSON line."""
    import dataclasses

    import torch

    from mechme.engine.capture import capture

    loaded, spec, _ = setup(args, args.tokens)
    spec = dataclasses.replace(spec, tokens="all")
    # Weights are memory-mapped, so they count in RSS only once read; read them here.
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.sum()
    resident = current_rss_mib()
    # ru_maxrss also counts the peak of loading the model, which can exceed the
    # capture's own peak. Writing 5 to clear_refs resets VmHWM (Linux 4.0 or later),
    # so VmHWM afterwards is the peak during the capture alone.
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mechme-bench-", dir=ROOT / "runs") as tmp:
        path = capture(loaded, spec, out=tmp, progress=False, resume=False)
        file_mib = path.stat().st_size / 2**20
    print(json.dumps({
        "tokens": args.tokens,
        "rss_model_resident_mib": resident,
        "peak_rss_mib": peak_rss_mib(),
        "capture_peak_mib": status_mib("VmHWM"),
        "file_mib": file_mib,
        "seconds": time.perf_counter() - start,
    }), flush=True)


def run_child(args: argparse.Namespace, tokens: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--tokens", str(tokens),
        "--model", args.model, "--text", args.text, "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
    ]
    log(f"memory: capture at {tokens} tokens (fresh process)")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"memory child at {tokens} tokens failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> dict:
    runs = []
    for tokens in (args.memory_tokens, args.memory_tokens * args.memory_scale):
        run = run_child(args, tokens)
        log(f"  peak RSS {run['peak_rss_mib']:.0f} MiB, during capture {run['capture_peak_mib']:.0f} MiB "
            f"(model resident {run['rss_model_resident_mib']:.0f} MiB), "
            f"file {run['file_mib']:.0f} MiB, {run['seconds']:.0f} s")
        runs.append(run)
    low, high = runs
    return {
        "runs": runs,
        "peak_ratio": high["peak_rss_mib"] / low["peak_rss_mib"],
        "capture_peak_ratio": high["capture_peak_mib"] / low["capture_peak_mib"],
        "capture_growth_mib": [r["capture_peak_mib"] - r["rss_model_resident_mib"] for r in runs],
    }


# -- report --------------------------------------------------------------------------


def machine_info() -> dict:
    import platform

    import h5py
    import nnsight
    import torch

    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    total_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "ram_gib": round(total_kib / 2**20, 1),
        "python": platform.python_version(), "torch": torch.__version__, "nnsight": nnsight.__version__,
        "h5py": h5py.__version__, "gpu": torch.cuda.is_available(),
    }


def markdown(results: dict) -> str:
    throughput = results["throughput"]
    args = results["args"]
    lines = [
        f"Throughput: {throughput['tokens_per_pass']} tokens per pass ({throughput['batches_per_pass']} batch(es) "
        f"of {args['batch_size']} x {args['seq_len']}), median of {throughput['repeats']} interleaved repeats, "
        f"{args['threads']} threads.",
        "",
        "| method | median s | min s | max s | tokens/s | ratio to plain forward | ratio to decoder only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in throughput["rows"]:
        lines.append(
            f"| {row['method']} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} "
            f"| {row['tokens_per_s']:.0f} | {row['ratio_to_plain_forward']:.3f} | {row['ratio_to_decoder_only']:.3f} |"
        )
    writes = results["writes"]
    shape = " x ".join(str(v) for v in writes["array_shape"])
    lines += [
        "",
        f"Write rate: resid_post at all tokens of every layer, a [{shape}] float32 array "
        f"({writes['array_mib']:.0f} MiB), median of {args['repeats']} repeats, page cache included.",
        "",
        "| method | median s | MiB/s | ratio to plain | file MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in writes["rows"]:
        lines.append(
            f"| {row['method']} | {row['median_s']:.2f} | {row['mib_per_s']:.0f} | {row['ratio_to_plain']:.2f} "
            f"| {row['file_mib']:.0f} |"
        )
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            "Memory of a fresh process capturing resid_post at all tokens of every layer (gzip). "
            "'ru_maxrss' is the process peak, model loading included; 'capture peak' is VmHWM reset "
            "just before capture(); 'growth' is the capture peak minus the RSS after loading the "
            "model and reading its weights.",
            "",
            "| tokens | model resident MiB | ru_maxrss MiB | capture peak MiB | growth MiB | file MiB | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in memory["runs"]:
            lines.append(
                f"| {run['tokens']} | {run['rss_model_resident_mib']:.0f} | {run['peak_rss_mib']:.0f} "
                f"| {run['capture_peak_mib']:.0f} | {run['capture_peak_mib'] - run['rss_model_resident_mib']:.0f} "
                f"| {run['file_mib']:.0f} | {run['seconds']:.1f} |"
            )
        lines += [
            "",
            f"- capture peak at 10 x N / at N = {memory['capture_peak_ratio']:.3f}; "
            f"ru_maxrss ratio {memory['peak_ratio']:.3f}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        if args.tokens is None:
            raise SystemExit("--child needs --tokens")
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
    # Temporary files go under runs/, on the same disk as real captures.
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mechme-bench-", dir=ROOT / "runs") as tmp:
        results["throughput"] = time_throughput(args, Path(tmp))
        results["writes"] = time_writes(args, Path(tmp))
    if not args.skip_memory:
        results["memory"] = measure_memory(args)
    results["load_average_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started

    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
