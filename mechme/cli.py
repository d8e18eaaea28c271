"""Command-line interface: a thin layer over the library.

Every command prints a readable table by default and one JSON object on stdout with
``--json``. Progress bars and log lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mechme.cli_options import add_model_option, add_text_options
from mechme.errors import MechmeError

logger = logging.getLogger("mechme")


def _add_model(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechme", description="Find, explain and mitigate massive activations in language models."
    )
    parser.add_argument("--version", action="store_true", help="print the mechme version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("scan", help="scan a model for massive activations and locate its ME Layer")
    _add_model(p)
    add_text_options(p)
    p.add_argument("--max-tokens", type=int, metavar="N", help="stop after N tokens in total")
    p.add_argument("--seq-len", type=int, default=256, metavar="T", help="tokens per row (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward pass (default: 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (default: float32)")
    p.add_argument("--abs-threshold", type=float, default=100.0, help="massive if |a| exceeds this (default: 100)")
    p.add_argument(
        "--ratio-threshold", type=float, default=1000.0, help="... and this multiple of the prompt median (default: 1000)"
    )
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file and figure (default: runs)")
    p.add_argument("--no-resume", action="store_true", help="recompute even if a finished run or checkpoints exist")

    p = sub.add_parser("run", help="run a study defined in a Python file")
    p.add_argument("study", metavar="STUDY.py", help="Python file that defines a mechme.specs.Study (one per file)")
    p.add_argument("--remote", choices=["local", "ndif"], help="run traces through nnsight's remote path")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file (default: runs)")
    p.add_argument("--no-resume", action="store_true", help="recompute even if a finished run or checkpoints exist")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("attribute", help="attribute the massive activation to FFN neurons and norm gains")
    _add_model(p)
    p.add_argument("--prompts", metavar="NAME", default="sentences", help="bundled prompt set (default: sentences)")
    p.add_argument("--neurons", type=int, default=8, metavar="N", help="neurons to ablate (default: 8)")
    p.add_argument("--gain-dims", type=int, default=8, metavar="N", help="gain dims to ablate (default: 8)")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file (default: runs)")

    p = sub.add_parser("finetune", help="fine-tune a model, with or without WeMask in the forward pass")
    _add_model(p)
    p.add_argument("--wemask", metavar="SPEC", help="WeMask spec ('default' or key=value,...); omit for no mask")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="max tokens per example (default: 256)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default: 2e-5)")
    p.add_argument("--examples", type=int, default=2000, help="generated training problems (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, order and torch (default: 0)")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the saved model (default: runs)")

    p = sub.add_parser("findings", help="run analyses and write the findings page")
    p.add_argument("analyses", nargs="+", metavar="FILE", help="analysis files (analyses/*.py)")
    p.add_argument("--out", default="docs/findings.md", metavar="PATH", help="page to write (default: docs/findings.md)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder for run files and figures (default: runs)")

    p = sub.add_parser("sweep", help="choose WeMask settings on a task's validation split")
    _add_model(p)
    p.add_argument("--task", default="arc_easy", help="task to tune on (default: arc_easy)")
    p.add_argument("--limit", type=int, default=200, help="validation items (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item draw (default: 0)")
    p.add_argument("--dims", default="gain,activation,massive", help="comma-separated dim rules")
    p.add_argument("--k", default="2", help="comma-separated numbers of dims (default: 2)")
    p.add_argument("--layers", default="after_me,next_only", help="comma-separated layer rules")
    p.add_argument("--gamma", default="1.0,0.5", help="comma-separated gamma values")
    p.add_argument("--max-new-tokens", type=int, help="generation budget for generation tasks")
    p.add_argument("--record-in-repository", action="store_true",
                   help="also write the choice to data/wemask/MODEL.json, which ships with mechme")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file (default: runs)")

    p = sub.add_parser("report", help="write one self-contained HTML report from run files")
    p.add_argument("runs", nargs="+", metavar="RUN_FILE", help="run files (.h5) written by mechme")
    p.add_argument("--out", default="report.html", metavar="PATH", help="HTML file to write (default: report.html)")

    _add_module_parsers(sub)

    p = sub.add_parser("cache", help="show or clear the safetensors cache of the bundled models")
    p.add_argument("action", choices=["list", "clear", "path"], help="list entries, clear them, or print the folder")
    p.add_argument("--name", help="one bundled model (default: all)")
    return parser


# Commands that live in their own modules: module name -> function that adds parsers.
EXTRA_COMMANDS = {"mechme.cli_measures": "add_parsers", "mechme.cli_capture": "add_parser",
                  "mechme.cli_eval": "add_parser"}


def _add_module_parsers(sub) -> None:
    import importlib

    for module_name, adder in EXTRA_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        getattr(module, adder)(sub)
        COMMANDS.update(module.COMMANDS)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="mechme: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mechme import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except MechmeError as err:
        print(f"mechme {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mechme {args.command}: interrupted; finished batches are kept and a rerun resumes", file=sys.stderr)
        return 130


def cmd_scan(args) -> int:
    from mechme.engine.scan import ScanSpec, scan
    from mechme.reports import format_scan

    spec = ScanSpec(
        model=args.model,
        prompts=args.prompts,
        text=args.text,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        abs_threshold=args.abs_threshold,
        ratio_threshold=args.ratio_threshold,
    )
    result = scan(spec, out=args.out, progress=True, resume=not args.no_resume)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_scan(result))
    return 0


def cmd_run(args) -> int:
    from mechme.engine.study import load_study_file, run_study
    from mechme.models.loading import NDIF_PREFIX
    from mechme.reports import format_study

    from mechme.findings import load_analysis

    analysis = load_analysis(args.study)
    if analysis is not None:
        from mechme.store.runfile import check_writable

        finding = analysis(check_writable(args.out), remote=args.remote)
        if args.json:
            print(json.dumps({"title": finding.title, "verdict": finding.verdict, "measured": finding.measured,
                              "stores": [str(p) for p in finding.stores],
                              "figures": [str(p) for p in finding.figures]}))
        else:
            print(f"{finding.title}: {finding.verdict}\n\n{finding.table}\n\n{finding.measured}\n\n{finding.reason}")
        return 0
    study = load_study_file(args.study)
    remote = None
    if args.remote == "local":
        remote = "local"
    elif args.remote == "ndif" and not study.model.startswith(NDIF_PREFIX):
        raise MechmeError(
            f"--remote ndif needs a model hosted on NDIF, but the study's model is {study.model!r}; "
            "set model='ndif:ORG/NAME' in the study"
        )
    result = run_study(study, out=args.out, progress=True, resume=not args.no_resume, remote=remote)
    summary = result.summary()
    if args.json:
        print(json.dumps({"store": str(result.store) if result.store else None, "conditions": summary}))
    else:
        print(format_study(study.name, summary, result.store))
        if result.figure:
            print(f"figure:   {result.figure}")
    return 0


def cmd_attribute(args) -> int:
    from mechme.engine.attribution import attribute
    from mechme.models import load_model
    from mechme.reports import format_attribution

    model = load_model(args.model)
    result = attribute(model, prompts=args.prompts, n_neurons=args.neurons, n_gain_dims=args.gain_dims,
                       out=args.out, progress=True)
    print(json.dumps(result) if args.json else format_attribution(result))
    return 0


def cmd_finetune(args) -> int:
    from mechme.mitigation.finetune import FinetuneSpec, finetune
    from mechme.models import load_model

    spec = FinetuneSpec(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        n_examples=args.examples, seed=args.seed, wemask=args.wemask)
    summary = finetune(load_model(args.model), spec, out=args.out, progress=True)
    summary.pop("excluded_gsm8k_ids")
    losses = summary.pop("losses")
    if args.json:
        print(json.dumps({**summary, "losses": losses}))
    else:
        print(f"trained {summary['steps']} steps on {summary['tokens']} tokens in {summary['seconds']:.0f} s; "
              f"loss {summary['loss_first10']:.3f} -> {summary['loss_last10']:.3f} "
              f"(mean of the first and last 10 steps); WeMask: {summary['wemask'] or 'none'}")
        print(f"saved: {summary['saved']}  (evaluate with: mechme eval --model {summary['saved']} --task T)")
    return 0


def cmd_findings(args) -> int:
    from pathlib import Path

    from mechme.findings import load_analysis, write_findings
    from mechme.store.runfile import check_writable

    runs = check_writable(args.runs)
    results = []
    for path in args.analyses:
        analysis = load_analysis(path)
        if analysis is None:
            raise MechmeError(f"{path} defines no analysis(out, remote=None) function")
        print(f"running {path}", file=sys.stderr)
        results.append((Path(path), analysis(runs)))
    print(write_findings(results, args.out))
    return 0


def cmd_sweep(args) -> int:
    from mechme.mitigation.sweep import sweep
    from mechme.models import load_model

    grid = {
        "dims": tuple(args.dims.split(",")),
        "k": tuple(int(k) for k in args.k.split(",")),
        "layers": tuple(args.layers.split(",")),
        "gamma": tuple(float(g) for g in args.gamma.split(",")),
    }
    result = sweep(load_model(args.model), task=args.task, limit=args.limit, seed=args.seed, grid=grid,
                   out=args.out, record_in_repository=args.record_in_repository, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    from mechme.reports import format_table

    rows = [{"setting": p["describe"], "score": p["score"], "low": p["ci95"][0], "high": p["ci95"][1]}
            for p in result["points"]]
    print(f"model {result['model']}, {result['task']} validation (n={result['n']}, {result['metric']}): "
          f"baseline {result['baseline_score']:.4f}")
    print(format_table(rows, [("setting", "setting", ""), ("score", "score", ".4f"), ("low", "95% low", ".4f"),
                              ("high", "95% high", ".4f")]))
    print(f"chosen: {result['chosen']} ({'above' if result['helps_on_validation'] else 'not above'} the baseline)")
    print(f"recorded as the default for --wemask default: {result['recorded']}")
    return 0


def cmd_report(args) -> int:
    from mechme.plots.report import write_report

    print(write_report(args.runs, args.out))
    return 0


def cmd_cache(args) -> int:
    from mechme.models import bundled

    names = [args.name] if args.name else list(bundled.BUNDLED)
    for name in names:
        if name not in bundled.BUNDLED:
            raise MechmeError(f"unknown bundled model {name!r}; choose one of {', '.join(bundled.BUNDLED)}")
    if args.action == "path":
        print(bundled.cache_root() / "models")
    elif args.action == "clear":
        removed = [p for n in names for p in bundled.clear_cache(n)]
        print("\n".join(f"removed {p}" for p in removed) or "nothing to clear")
    else:
        for name in names:
            print(f"{name:14s} {bundled.cache_status(name):8s} {bundled.cache_dir(name)}")
    return 0


COMMANDS = {"scan": cmd_scan, "run": cmd_run, "attribute": cmd_attribute, "report": cmd_report, "finetune": cmd_finetune,
            "findings": cmd_findings, "sweep": cmd_sweep,
            "cache": cmd_cache}


if __name__ == "__main__":
    sys.exit(main())
