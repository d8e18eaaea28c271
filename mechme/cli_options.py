"""Command-line options shared by several subcommands, so each reads the same way."""

from __future__ import annotations

import argparse


def add_model_option(parser: argparse.ArgumentParser, *, ndif: bool = True) -> None:
    """Add ``--model REF``; ``ndif`` says whether the command accepts ``ndif:ORG/NAME``."""
    from mechme.models.loading import DEFAULT_MODEL

    kinds = "model folder, .gguf file, cached hub id, or ndif:ORG/NAME" if ndif else \
        "model folder, .gguf file or cached hub id"
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="REF",
        help=f"bundled name (smollm2-135m, gemma3-270m), {kinds} (default: {DEFAULT_MODEL})",
    )


def add_text_options(parser: argparse.ArgumentParser) -> None:
    """Add the mutually exclusive ``--text PATH`` and ``--prompts NAME``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="PATH", help="UTF-8 .txt file, or .jsonl with a 'text' field")
    source.add_argument("--prompts", metavar="NAME", default="sentences", help="bundled prompt set (default: sentences)")
