"""The ``mechme capture`` command: save activations to an HDF5 file for offline use.

`add_parser` adds the subcommand to the main parser, and `COMMANDS` maps its name to the
function that runs it, as in `mechme.cli`.
"""

from __future__ import annotations

import argparse
import json

from mechme.cli_options import add_model_option, add_text_options
from mechme.models.architectures import SITES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``capture`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "capture",
        help="save activations at chosen sites, layers and tokens to an HDF5 file",
        description="Capture activations to runs/capture-<hash>.h5, readable with "
        "xarray.open_dataset(path, engine='h5netcdf') and h5py. Values are stored as float32.",
    )
    add_model_option(p)
    p.add_argument(
        "--site",
        dest="sites",
        action="append",
        required=True,
        metavar="SITE",
        help=f"site to capture; repeat for several. One of: {', '.join(SITES)}",
    )
    p.add_argument(
        "--tokens",
        default="first",
        metavar="first|all|delimiters|POSITIONS",
        help="tokens to keep: the first real token (default), all, punctuation and newlines, "
        "or real positions such as 0,3,-1",
    )
    p.add_argument("--layers", metavar="RANGE", help="layers to capture, e.g. 0-29, 11 or 3,5,7 (default: all)")
    add_text_options(p)
    p.add_argument("--max-tokens", type=int, metavar="N", help="stop after N tokens of text in total")
    p.add_argument("--seq-len", type=int, default=256, metavar="T", help="tokens per row (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward pass (default: 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model dtype (default: float32); values are stored as float32 either way")
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"],
                   help="gzip (level 1) or none; on SmolLM2-135M, none wrote 12 times faster and its file was "
                   "15%% larger (default: gzip)")
    p.add_argument("--out", default="runs", metavar="DIR", help="folder for the capture file (default: runs)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if a finished or interrupted capture with the same spec exists")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def cmd_capture(args) -> int:
    """Run a capture from parsed arguments and print where it went."""
    from mechme.engine.capture import CaptureSpec, capture, describe_capture, format_layers

    spec = CaptureSpec(
        model=args.model,
        sites=tuple(args.sites),
        layers=args.layers,
        tokens=args.tokens,
        prompts=args.prompts,
        text=args.text,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        compression=args.compression,
    )
    path = capture(spec=spec, out=args.out, progress=True, resume=not args.no_resume)
    summary = describe_capture(path)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"capture file: {summary['store']}")
    print(f"model:        {summary['model']}")
    print(f"sites:        {', '.join(summary['sites'])}")
    print(f"layers:       {format_layers(summary['layers'])}")
    print(f"tokens:       {summary['n_tokens']} ({summary['tokens']['kind']})")
    print(f"size:         {summary['bytes']} bytes of float32 values, {summary['file_bytes']} bytes on disk")
    return 0


COMMANDS = {"capture": cmd_capture}
