"""Text sources: bundled prompt sets, text files and JSONL, cut into token batches.

Two shapes of input:

- **prompts**: each line of a prompt set (or each record of a JSONL file) is one row,
  tokenized with the tokenizer's defaults (so Gemma gets its ``<bos>``), truncated to
  ``seq_len`` and left-padded within a batch;
- **text**: a whole document is tokenized once and cut into rows of ``seq_len`` tokens,
  each starting with BOS when the tokenizer adds one. No row is padded.

Positions count real tokens: with left padding, position 0 is a row's first non-pad
token, which is where massive activations sit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mechme.errors import SpecError, TextError

DATA_DIR = Path(os.environ.get("MECHME_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))


def prompt_set_names() -> list[str]:
    return sorted(p.stem for p in (DATA_DIR / "prompts").glob("*.txt"))


def load_prompt_set(name: str) -> list[str]:
    """Return the prompts of a bundled set, one per non-empty line of ``data/prompts/NAME.txt``."""
    path = DATA_DIR / "prompts" / f"{name}.txt"
    if not path.is_file():
        raise TextError(f"unknown prompt set {name!r}; available sets: {', '.join(prompt_set_names()) or 'none'}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_text_file(path: str | Path, field: str = "text") -> tuple[str, list[str]]:
    """Read a UTF-8 text file or a JSONL file with a text field.

    Returns:
        ``("text", [document])`` for a plain file, ``("prompts", records)`` for JSONL.
    """
    path = Path(path)
    if not path.is_file():
        raise TextError(f"text file {str(path)!r} not found; pass an existing UTF-8 .txt or .jsonl file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(
            f"text file {str(path)!r} is not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from err
    if not content.strip():
        raise TextError(f"text file {str(path)!r} is empty; pass a file with text in it")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise TextError(f"{path}:{number} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise TextError(f"{path}:{number} has no string field {field!r} (found {keys})")
            if record[field].strip():
                records.append(record[field])
        if not records:
            raise TextError(f"text file {str(path)!r} has no non-empty {field!r} records")
        return "prompts", records
    return "text", [content]


def sha256_text(items: list[str]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8") + b"\x00")
    return digest.hexdigest()


@dataclass
class Batch:
    """One left-padded batch of token rows.

    Attributes:
        index: batch number within the run.
        prompt_ids: global prompt (row) index of each row.
        input_ids, attention_mask, position_ids: ``[batch, seq]`` tensors for the model.
        n_pad: number of left pad tokens in each row.
    """

    index: int
    prompt_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_pad: list[int]

    @property
    def lengths(self) -> list[int]:
        return [self.input_ids.shape[1] - p for p in self.n_pad]

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def bos_id(tokenizer) -> int | None:
    """Return the BOS id the tokenizer prepends by default, or None when it adds none."""
    probe = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return tokenizer.bos_token_id
    return None


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def tokenize_rows(tokenizer, kind: str, items: list[str], *, seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """Turn prompts or documents into token rows, following the module rules."""
    if seq_len < 2:
        raise SpecError(f"seq_len {seq_len} is too short; use at least 2 tokens")
    if max_tokens is not None and max_tokens < 1:
        raise SpecError(f"max_tokens {max_tokens} must be positive; pass a number of tokens such as 4096")
    rows: list[list[int]] = []
    bos = bos_id(tokenizer)
    if kind == "prompts":
        for item in items:
            ids = tokenizer(item).input_ids[:seq_len]
            rows.append(ids)
    elif kind == "text":
        body = seq_len - (1 if bos is not None else 0)
        for item in items:
            ids = tokenizer(item, add_special_tokens=False).input_ids
            for start in range(0, len(ids), body):
                chunk = ids[start:start + body]
                rows.append(([bos] if bos is not None else []) + chunk)
    else:
        raise SpecError(f"invalid text kind {kind!r}; use 'prompts' or 'text'")
    if max_tokens is not None:
        truncated, total = [], 0
        for row in rows:
            if total >= max_tokens:
                break
            row = row[: max_tokens - total]
            truncated.append(row)
            total += len(row)
        rows = truncated
    # A row needs two tokens of text besides an added BOS.
    min_len = 2 + (1 if bos is not None else 0)
    rows = [row for row in rows if len(row) >= min_len]
    if not rows:
        raise TextError(
            "the text is shorter than two tokens after tokenization (a BOS token does not count); "
            "pass longer text"
        )
    return rows


def make_batches(rows: list[list[int]], *, batch_size: int, pad: int) -> list[Batch]:
    """Group token rows into left-padded batches with mask-derived position ids."""
    if batch_size < 1:
        raise SpecError(f"batch_size {batch_size} must be at least 1")
    batches = []
    for index, start in enumerate(range(0, len(rows), batch_size)):
        group = rows[start:start + batch_size]
        width = max(len(r) for r in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        n_pad = []
        for b, row in enumerate(group):
            p = width - len(row)
            ids[b, p:] = torch.tensor(row, dtype=torch.long)
            mask[b, p:] = 1
            n_pad.append(p)
        # Left-padded rows keep their own positions, as in an unpadded run.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(Batch(index, list(range(start, start + len(group))), ids, mask, position_ids, n_pad))
    return batches
