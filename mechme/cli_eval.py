"""Subcommand `mechme eval`: benchmark a model, optionally with WeMask applied.

`add_parser` adds ``eval`` to the ``mechme`` subparsers, and `COMMANDS` maps the name
to the function that runs it. It prints a table by default and one JSON object with
``--json``; the run file and a markdown table go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mechme.cli_options import add_model_option
from mechme.errors import MechmeError, SpecError


def add_parser(subparsers) -> None:
    """Add the ``eval`` subcommand to ``mechme``'s subparsers."""
    from mechme.evaluation.tasks import SPLITS, TASKS
    p = subparsers.add_parser(
        "eval", help="score a model on a benchmark (data shipped in PyPI packages), with and without WeMask"
    )
    add_model_option(p, ndif=False)
    p.add_argument("--task", required=True, metavar="T", help=f"benchmark: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate N items drawn at random from the split "
                   "(default: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the item draw and of the bootstrap and permutation tests (default: 0)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="validation (for tuning) or test (for reporting); the two are disjoint (default: test)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="generation budget in tokens for gsm8k, math500 and ifeval (default: 256, 512, 256)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="items per forward pass (default: 8)")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file and table (default: runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--wemask",
        metavar="SPEC",
        help="also evaluate with WeMask on the same items: 'default' or key=value pairs such as "
        "'dims=gain,k=4'; adds baseline_score and paired_p",
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from mechme.evaluation.tasks import evaluate, format_result, get_task
    from mechme.models.loading import load_model

    # Check the cheap options before the model load, so a typo fails fast.
    get_task(args.task)
    if args.limit is not None and args.limit < 1:
        raise SpecError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise SpecError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(args.model)
    intervention = _wemask(args.wemask, model) if args.wemask is not None else None
    exclude = _finetune_overlap(args.model) if args.task == "gsm8k" else []
    if exclude:
        print(f"leaving out the {len(exclude)} GSM8K questions this fine-tune's training problems were written from",
              file=sys.stderr)
    result = evaluate(
        model, args.task, limit=args.limit, seed=args.seed, intervention=intervention, split=args.split,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True, out=args.out,
        exclude=exclude,
    )
    print(json.dumps(result, default=str) if args.json else format_result(result))
    return 0


def _finetune_overlap(ref: str) -> list[str]:
    """Return the GSM8K ids recorded by `mechme finetune` in a saved model folder, if any."""
    record = Path(ref).expanduser() / "mechme-finetune.json"
    if not record.is_file():
        return []
    return list(json.loads(record.read_text()).get("excluded_gsm8k_ids", []))


def _wemask(spec: str, model):
    try:
        from mechme.mitigation.wemask import parse_wemask
    except ImportError as err:
        raise MechmeError(
            f"--wemask needs mechme.mitigation.wemask, which failed to import ({err}); "
            "update mechme or run without --wemask"
        ) from err
    return parse_wemask(spec, model)


COMMANDS = {"eval": cmd_eval}
