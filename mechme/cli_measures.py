"""Subcommands `mechme rigidity` and `mechme sinks`.

`add_parsers` adds both to the ``mechme`` subparsers, and `COMMANDS` maps each name to
the function that runs it. Each prints a table by default and one JSON object with
``--json``, and writes a run file and figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json

from mechme.cli_options import add_model_option, add_text_options
from mechme.errors import SpecError

BUILTIN_CONDITIONS = ("remove-massive",)


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser, ndif=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_text_options(parser)
    parser.add_argument("--seq-len", type=int, default=64, metavar="T",
                        help="tokens per row; longer prompts are truncated (default: 64)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="stop after N tokens in total")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward pass (default: 8)")
    parser.add_argument("--out", default="runs", metavar="DIR", help="folder for the run file and figures (default: runs)")
    parser.add_argument(
        "--condition",
        action="append",
        default=[],
        choices=BUILTIN_CONDITIONS,
        metavar="NAME",
        help="also run a built-in condition: remove-massive zeroes the MLP output (mlp_out) at the first "
        "token of the ME Layer found by a scan; may be repeated",
    )


def add_parsers(subparsers) -> None:
    """Add the ``rigidity`` and ``sinks`` subcommands to ``mechme``'s subparsers."""
    p = subparsers.add_parser(
        "rigidity", help="measure how fixed the first token's state is, and the diversity of the attention input"
    )
    _add_common(p)
    p = subparsers.add_parser("sinks", help="measure attention to the first token and the Gu et al. sink rate")
    _add_common(p)
    p.add_argument("--epsilon", type=float, default=0.3,
                   help="a head is a sink when its mean attention to the first token exceeds this (default: 0.3)")


def builtin_condition(name: str, verdict: dict):
    """Return the built-in condition ``name`` for a model whose scan gave ``verdict``."""
    from mechme.specs.core import Condition, Intervention, Tokens, Zero

    if name != "remove-massive":
        raise SpecError(f"unknown condition {name!r}; built-in conditions: {', '.join(BUILTIN_CONDITIONS)}")
    me = verdict.get("me_layer")
    if me is None:
        raise SpecError(
            "condition 'remove-massive' needs an ME Layer, but the scan found no massive activations "
            "in this model and text; run without --condition"
        )
    return Condition(
        name=name,
        interventions=(Intervention(site="mlp_out", layers=(me,), tokens=Tokens.first(), op=Zero()),),
    )


def _prepare(args):
    """Load the model, scan it for its ME Layer and build the requested conditions."""
    from mechme.engine.scan import ScanSpec, scan
    from mechme.models.loading import load_model

    for name, value, least in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise SpecError(f"{name} must be at least {least}, got {value}")
    model = load_model(args.model)
    spec = ScanSpec(model=args.model, prompts=args.prompts, text=args.text, seq_len=args.seq_len,
                    max_tokens=args.max_tokens, batch_size=args.batch_size)
    verdict = scan(spec, model=model, out=None, progress=False).verdict
    names = list(dict.fromkeys(args.condition))
    conditions = [builtin_condition(name, verdict) for name in names]
    options = {"prompts": args.prompts, "text": args.text, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
               "batch_size": args.batch_size, "out": args.out, "verdict": verdict}
    return model, conditions, options


def _number(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_rigidity(summary: dict) -> str:
    """Format a rigidity summary as a per-layer table."""
    lines = [f"model {summary['model']}: {summary['n_prompts']} prompts, ME Layer {summary['me_layer']}"]
    blocks = [("baseline", summary)] + list(summary.get("conditions", {}).items())
    for name, block in blocks:
        lines += [
            "",
            f"[{name}] position 0 vs ordinary tokens (resid_post); diversity of attn_in with / without position 0",
            "layer  cos_prev  across   norm       | ord cos_prev  ord across  ord norm  "
            "| mean_cos  w/o 0   erank   w/o 0",
        ]
        for row, div in zip(block["layers"], block["diversity"]):
            ordinary = row["ordinary"]
            lines.append(
                f"{row['layer']:5d}  {_number(row['cos_prev'])}  {_number(row['cos_across_prompts'])}  "
                f"{_number(row['norm'], '10.4g')} | {_number(ordinary['cos_prev']):>12}  "
                f"{_number(ordinary['cos_across_prompts']):>10}  {_number(ordinary['norm'], '8.4g')}  "
                f"| {_number(div['mean_cos']):>8}  {_number(div['mean_cos_without_massive'])}  "
                f"{_number(div['erank'], '6.2f')}  {_number(div['erank_without_massive'], '6.2f')}"
            )
    lines += ["", f"run file: {summary['store']}"] + [f"figure:   {f}" for f in summary["figures"]]
    return "\n".join(lines)


def format_sinks(summary: dict) -> str:
    """Format a sinks summary as a per-layer table."""
    lines = [
        f"model {summary['model']}: {summary['n_prompts']} prompts of at most {summary['seq_len']} tokens, "
        f"ME Layer {summary['me_layer']}, epsilon {summary['epsilon']:g}",
    ]
    blocks = [("baseline", summary)] + list(summary.get("conditions", {}).items())
    names = [name for name, _ in blocks]
    lines.append("layer  " + "  ".join(f"{name + ' attn to first':>28}  {'sink %':>6}" for name in names))
    for i, row in enumerate(summary["layers"]):
        cells = []
        for _, block in blocks:
            r = block["layers"][i]
            cells.append(f"{r['mean_attention_to_first']:28.4f}  {r['sink_rate']:6.1f}")
        lines.append(f"{row['layer']:5d}  " + "  ".join(cells))
    lines.append("")
    for name, block in blocks:
        after = block.get("sink_rate_after_me_layer")
        lines.append(f"{name}: sink rate {block['sink_rate']:.1f}%"
                     + ("" if after is None else f" ({after:.1f}% after the ME Layer)"))
    lines += ["", f"run file: {summary['store']}", f"figure:   {summary['figure']}"]
    return "\n".join(lines)


def cmd_rigidity(args) -> int:
    from mechme.measures.rigidity import measure_rigidity

    model, conditions, options = _prepare(args)
    _, summary = measure_rigidity(model, conditions=conditions, progress=True, **options)
    print(json.dumps(summary) if args.json else format_rigidity(summary))
    return 0


def cmd_sinks(args) -> int:
    from mechme.measures.sinks import measure_sinks

    model, conditions, options = _prepare(args)
    _, summary = measure_sinks(model, conditions=conditions, epsilon=args.epsilon, progress=True, **options)
    print(json.dumps(summary) if args.json else format_sinks(summary))
    return 0


COMMANDS = {"rigidity": cmd_rigidity, "sinks": cmd_sinks}
