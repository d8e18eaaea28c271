"""Capture activation tensors to HDF5, for offline analysis and for patching.

`capture` runs the text through the model batch by batch, one nnsight trace per batch.
Each trace reads the requested (layer, site) pairs in forward order, keeps only the
selected tokens on the device, and the client writes them into one chunked HDF5 dataset
per site, gzip-compressed unless ``compression="none"``. Only the current batch is held
in memory.

File layout (HDF5 dimension scales as netCDF-4 uses them, so both
``xarray.open_dataset(path, engine="h5netcdf")`` and ``h5py.File(path)`` read it; the
netCDF-C library itself has not been tried):

- ``Tokens.first()``: each site is an array ``[prompt, layer, dim]`` (``neuron`` for
  ``mlp_hidden``), with coordinates ``position``, ``token_id`` and ``token_string``
  per prompt.
- any other selector: each site is ``[token, layer, dim]`` over a flat token axis (no
  padding), with per-token coordinates ``prompt``, ``position``, ``token_id`` and
  ``token_string``.
- the group ``prompts`` contains per-prompt ``length`` and ``ids_sha256`` (the sha256 of
  the prompt's token ids), which `load_patch` uses to find a prompt by its text.

Values are float32 whatever the model dtype, because bfloat16 cannot hold massive values
exactly. Chunks span one layer, so selecting a layer reads only that layer's chunks.
Every chunk carries a Fletcher-32 checksum and unwritten entries read as NaN, so a
damaged file raises an error on read instead of returning zeros.

A capture is written to ``capture-<hash>.partial.h5`` and renamed to
``capture-<hash>.h5`` once complete, where ``<hash>`` is the first 12 hex digits of the
sha256 of its spec. The partial file records how many batches are finished, so an
interrupted capture resumes from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from mechme.engine.compile import token_positions
from mechme.engine.scan import ScanSpec, resolve_rows
from mechme.engine.sites import forward_order, read_site
from mechme.engine.text import Batch, make_batches, pad_id
from mechme.errors import SpecError, StoreError
from mechme.models.architectures import SITES
from mechme.models.loaded import LoadedModel
from mechme.models.loading import DEFAULT_MODEL, load_model, parse_dtype
from mechme.specs.core import Tokens, to_dict
from mechme.store import runfile

logger = logging.getLogger(__name__)

KIND = "capture"
FORMAT_VERSION = 1
BYTES_PER_VALUE = 4  # float32
CHUNK_BYTES = 256 * 1024
COMPRESSIONS = ("gzip", "none")
ATTR = runfile.ATTR_PREFIX


@dataclass(frozen=True, kw_only=True)
class CaptureSpec:
    """Spec of a capture: the sites, layers and tokens to save, and the text to run.

    Attributes:
        model: model reference (bundled name, folder, .gguf, hub id or ndif:ORG/NAME).
        sites: canonical sites to capture; stored in forward order.
        layers: layers to capture (None: all layers). A string such as ``"0-29"``,
            ``"11"`` or ``"3,5,7"`` is parsed.
        tokens: which tokens to keep; a string ``first``, ``all``, ``delimiters`` or
            comma-separated positions such as ``"0,3,-1"`` is parsed.
        prompts: name of a bundled prompt set, used when ``text`` is None.
        text: path of a UTF-8 .txt file or a .jsonl file with a ``text`` field.
        max_tokens: stop after this many tokens of text in total (None: all).
        seq_len: tokens per row; longer prompts are truncated.
        batch_size: rows per forward pass.
        dtype: model dtype, ``"float32"`` or ``"bfloat16"``; values are stored as float32.
        compression: ``"gzip"`` (level 1 with byte shuffling) or ``"none"``. On
            SmolLM2-135M residuals gzip made the file 15% smaller than ``"none"`` but
            wrote 12 times slower (benchmarks/bench_capture.py, 2-core CPU), so
            ``"none"`` suits large captures of all tokens.
    """

    model: str = DEFAULT_MODEL
    sites: tuple[str, ...] = ("resid_post",)
    layers: tuple[int, ...] | None = None
    tokens: Tokens = field(default_factory=Tokens.first)
    prompts: str = "sentences"
    text: str | None = None
    max_tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    compression: str = "gzip"

    def __post_init__(self):
        object.__setattr__(self, "sites", parse_sites(self.sites))
        if self.compression not in COMPRESSIONS:
            raise SpecError(f"invalid compression {self.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        if isinstance(self.tokens, str):
            object.__setattr__(self, "tokens", parse_tokens(self.tokens))
        elif not isinstance(self.tokens, Tokens):
            raise SpecError(f"tokens must be a Tokens selector or a string, got {self.tokens!r}")
        parse_dtype(self.dtype)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SpecError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.seq_len < 2:
            raise SpecError(f"seq_len must be at least 2, got {self.seq_len!r}")
        if self.batch_size < 1:
            raise SpecError(f"batch_size must be at least 1, got {self.batch_size!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sites"] = list(self.sites)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["tokens"] = to_dict(self.tokens)
        return out


def parse_sites(sites) -> tuple[str, ...]:
    """Return the sites as a tuple in forward order, or raise naming the valid ones."""
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    if not sites:
        raise SpecError(f"no site requested; pass at least one of {', '.join(SITES)}")
    for site in sites:
        if site not in SITES:
            raise SpecError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    return tuple(s for s in SITES if s in sites)


def parse_layers(layers) -> tuple[int, ...]:
    """Parse ``"0-29"``, ``"11"``, ``"3,5,7"`` (or an int or a list) into sorted unique layers."""
    if isinstance(layers, (int, np.integer)):
        values = [int(layers)]
    elif isinstance(layers, str):
        values = []
        for part in layers.replace(" ", "").split(","):
            try:
                if "-" in part.lstrip("-"):
                    low, high = part.split("-", 1)
                    values.extend(range(int(low), int(high) + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise SpecError(
                    f"invalid layer range {layers!r}; write e.g. '0-29', '11' or '3,5,7'"
                ) from None
    else:
        values = [int(v) for v in layers]
    if not values:
        raise SpecError(f"layer range {layers!r} selects no layer; write e.g. '0-29', '11' or '3,5,7'")
    negative = [v for v in values if v < 0]
    if negative:
        raise SpecError(f"layers must be non-negative, got {negative}; layers count from 0")
    return tuple(sorted(set(values)))


def parse_tokens(text: str) -> Tokens:
    """Parse a token selector: ``first``, ``all``, ``delimiters`` or positions ``"0,3,-1"``."""
    if text in ("first", "all", "delimiters"):
        return Tokens(kind=text)
    try:
        positions = [int(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        raise SpecError(
            f"invalid token selector {text!r}; use first, all, delimiters or positions such as 0,3,-1"
        ) from None
    return Tokens.at(*positions)


# -- planning ----------------------------------------------------------------------


@dataclass
class CapturePlan:
    """Everything a capture needs before its first trace: batches, picks, sizes, names."""

    spec: CaptureSpec
    layers: tuple[int, ...]
    widths: dict[str, int]  # site -> size of its last axis
    rows: list[list[int]]
    batches: list[Batch]
    picks: list[list[tuple[int, int]]]  # per batch: (row in batch, padded position)
    identity: dict

    @property
    def n_tokens(self) -> int:
        return sum(len(p) for p in self.picks)

    @property
    def n_bytes(self) -> int:
        """Bytes of the captured values, uncompressed."""
        return self.n_tokens * len(self.layers) * sum(self.widths.values()) * BYTES_PER_VALUE

    @property
    def digest(self) -> str:
        return runfile.spec_hash(self.identity)[:12]

    @property
    def flat(self) -> bool:
        """True when the token axis is flat (``token``), False for one row per prompt."""
        return self.spec.tokens.kind != "first"

    def size_message(self) -> str:
        widths = list(self.widths.values())
        if len(set(widths)) == 1:
            shape = f"{len(widths)} site(s) x {len(self.layers)} layer(s) x {widths[0]} dims"
        else:
            dims = " + ".join(str(w) for w in widths)
            shape = f"{len(self.layers)} layer(s) x ({dims}) dims of {len(widths)} sites"
        return (
            f"capture size: {self.n_tokens} tokens x {shape} x {BYTES_PER_VALUE} bytes = "
            f"{format_bytes(self.n_bytes)} before compression"
        )


def plan_capture(spec: CaptureSpec, model: LoadedModel) -> CapturePlan:
    """Validate ``spec`` against ``model``, tokenize the text and count the selected tokens."""
    for site in spec.sites:
        model.check_site(site)
    layers = spec.layers if spec.layers is not None else tuple(range(model.n_layers))
    for layer in layers:
        model.check_layer(layer)

    source, text_sha, rows = resolve_rows(
        ScanSpec(prompts=spec.prompts, text=spec.text, max_tokens=spec.max_tokens, seq_len=spec.seq_len),
        model.tokenizer,
    )
    batches = make_batches(rows, batch_size=spec.batch_size, pad=pad_id(model.tokenizer))
    picks = []
    for batch in batches:
        strings = [model.tokenizer.convert_ids_to_tokens(rows[i]) for i in batch.prompt_ids]
        picks.append(token_positions(spec.tokens, batch, strings))
    identity = {
        **spec.to_dict(),
        "model": model.ref,
        "layers": list(layers),
        "source": source,
        "text_sha256": text_sha,
        "weights_sha256": model.weights_sha256,
        "n_prompts": len(rows),
        "format_version": FORMAT_VERSION,
    }
    plan = CapturePlan(spec, layers, {s: model.site_width(s) for s in spec.sites}, rows, batches, picks, identity)
    if plan.n_tokens == 0:
        raise SpecError(
            f"token selector {_describe_tokens(spec.tokens)} matches no token in the {len(rows)} prompt(s) of "
            f"{source}; choose positions inside the prompts (the longest has {max(len(r) for r in rows)} tokens) "
            "or another selector"
        )
    return plan


def _describe_tokens(tokens: Tokens) -> str:
    if tokens.kind == "positions":
        return f"positions {','.join(str(p) for p in tokens.positions)}"
    return repr(tokens.kind)


def format_bytes(n: float) -> str:
    """Format a byte count with binary units, e.g. ``1.1 MiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def check_free_space(folder: Path, needed: int) -> None:
    """Raise `StoreError` when ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StoreError(
            f"not enough disk space in {str(folder)!r}: the capture needs {format_bytes(needed)} but only "
            f"{format_bytes(free)} is free; free some space, pass --out on another disk, or capture fewer "
            "tokens, layers or sites"
        )


# -- capture -------------------------------------------------------------------------


def capture(
    model: LoadedModel | str | None = None,
    spec: CaptureSpec | None = None,
    *,
    out: str | Path = "runs",
    progress: bool = True,
    resume: bool = True,
    **options,
) -> Path:
    """Capture activations at the spec's sites, layers and tokens into an HDF5 file.

    Args:
        model: a loaded model, a model reference, or None to load ``spec.model``.
        spec: what to capture; keyword ``options`` (``sites``, ``layers``, ``tokens``,
            ``prompts``, ``text``, ...) build or update one.
        out: folder for the capture file.
        progress: print the size and a progress bar on stderr.
        resume: continue an interrupted capture and reuse a finished one with the same spec.

    Returns:
        The path of the finished file, ``<out>/capture-<hash12>.h5``.

    Raises:
        SpecError: an unknown site, a layer out of range, or a selector that matches nothing.
        StoreError: the folder is not writable or lacks the space the capture needs.
    """
    if isinstance(model, str):
        options.setdefault("model", model)
        model = None
    if spec is None:
        spec = CaptureSpec(**options)
    elif options:
        spec = dataclasses.replace(spec, **options)
    folder = runfile.check_writable(out)
    if model is None:
        model = load_model(spec.model, dtype=spec.dtype)
    elif str(model.dtype).removeprefix("torch.") != spec.dtype:
        raise SpecError(f"the loaded model is {model.dtype}, but the spec asks for {spec.dtype!r}")

    plan = plan_capture(spec, model)
    final = folder / f"capture-{plan.digest}.h5"
    partial = folder / f"capture-{plan.digest}.partial.h5"
    full_hash = runfile.spec_hash(plan.identity)
    if final.exists():
        stored = runfile.stored_hash(final)
        if stored != full_hash:
            raise StoreError(
                f"{final} contains a capture with spec hash {stored!r}, not {full_hash!r}; it is never "
                "overwritten, so choose another output folder or delete it"
            )
        if resume:
            check_capture(final)
            _say(progress, f"capture: reusing the finished capture {final}")
            return final
        # Without resume the old file stays until the new one replaces it in one rename.

    done = _open_partial(partial, full_hash, resume)
    already = partial.stat().st_size if done else 0
    _say(progress, plan.size_message())
    check_free_space(folder, max(0, plan.n_bytes - already))
    if not done:
        _create_file(partial, plan, model)

    _write_batches(partial, plan, model, start=done, progress=progress)
    os.replace(partial, final)
    return final


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _open_partial(partial: Path, full_hash: str, resume: bool) -> int:
    """Return the number of finished batches in a partial file of this spec (0: start afresh)."""
    if not partial.exists():
        return 0
    if not resume:
        partial.unlink()
        return 0
    try:
        with h5py.File(partial, "r") as fh:
            stored = _text(fh.attrs.get(f"{ATTR}spec_hash"))
            done = int(fh.attrs.get(f"{ATTR}batches_done", 0))
    except OSError as err:
        # A process killed during a write can leave the file unreadable; its batches
        # cannot be trusted, so the capture starts again.
        logger.warning("%s is unreadable (%s); starting the capture again", partial, err)
        partial.unlink()
        return 0
    if stored != full_hash:
        raise StoreError(
            f"{partial} contains a partial capture with spec hash {stored!r}, not {full_hash!r}; it is never "
            "overwritten, so choose another output folder or delete it"
        )
    return done


def _create_file(path: Path, plan: CapturePlan, model: LoadedModel) -> None:
    """Create the partial file with its coordinates and empty, NaN-filled site datasets."""
    token_ids, token_strings, prompts, positions = [], [], [], []
    for batch, picks in zip(plan.batches, plan.picks):
        for row, col in picks:
            prompt = batch.prompt_ids[row]
            position = col - batch.n_pad[row]
            prompts.append(prompt)
            positions.append(position)
            token_ids.append(plan.rows[prompt][position])
    token_strings = model.tokenizer.convert_ids_to_tokens(token_ids)
    n = plan.n_tokens
    axis = "token" if plan.flat else "prompt"

    with h5py.File(path, "w") as fh:
        scales = {axis: _scale(fh, axis, np.arange(n, dtype=np.int64) if plan.flat else np.asarray(prompts))}
        scales["layer"] = _scale(fh, "layer", np.asarray(plan.layers, dtype=np.int64))
        for site in plan.spec.sites:
            name = _feature_dim(site)
            if name not in scales:
                scales[name] = _scale(fh, name, np.arange(plan.widths[site], dtype=np.int64))
        coords = {"position": np.asarray(positions, dtype=np.int64), "token_id": np.asarray(token_ids, dtype=np.int64)}
        if plan.flat:
            coords = {"prompt": np.asarray(prompts, dtype=np.int64), **coords}
        for name, values in coords.items():
            _attach(fh.create_dataset(name, data=values), scales[axis])
        strings = fh.create_dataset("token_string", data=np.asarray(token_strings, dtype=object),
                                    dtype=h5py.string_dtype())
        _attach(strings, scales[axis])
        coordinate_names = " ".join([*coords, "token_string"])

        layer_count = len(plan.layers)
        for site in plan.spec.sites:
            width = plan.widths[site]
            chunk_rows = max(1, min(n, CHUNK_BYTES // (width * BYTES_PER_VALUE)))
            dset = fh.create_dataset(
                site, shape=(n, layer_count, width), dtype=np.float32, chunks=(chunk_rows, 1, width),
                fillvalue=np.float32(np.nan), **_filters(plan.spec.compression),
            )
            _attach(dset, scales[axis], scales["layer"], scales[_feature_dim(site)])
            dset.attrs["coordinates"] = coordinate_names
            dset.attrs["description"] = f"{site} at the selected tokens, float32"
            dset.attrs[f"{ATTR}rows_written"] = 0

        _write_prompt_group(fh, plan.rows)
        fh.attrs.update(runfile.provenance(KIND, plan.identity, model.describe()))
        fh.attrs[f"{ATTR}tokens"] = json.dumps(to_dict(plan.spec.tokens))
        fh.attrs[f"{ATTR}sites"] = json.dumps(list(plan.spec.sites))
        fh.attrs[f"{ATTR}n_tokens"] = n
        fh.attrs[f"{ATTR}n_batches"] = len(plan.batches)
        fh.attrs[f"{ATTR}bytes"] = plan.n_bytes
        fh.attrs[f"{ATTR}batches_done"] = 0
        fh.attrs[f"{ATTR}complete"] = 0


def _filters(compression: str) -> dict:
    # Every chunk gets a Fletcher-32 checksum. Gzip, shuffle and Fletcher-32 are filters
    # built into HDF5, so any HDF5 reader can decode them (lzf, faster, is h5py's own).
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
    return {"fletcher32": True}


def _feature_dim(site: str) -> str:
    return "neuron" if site == "mlp_hidden" else "dim"


def _scale(fh: h5py.File | h5py.Group, name: str, values: np.ndarray) -> h5py.Dataset:
    dset = fh.create_dataset(name, data=values)
    dset.make_scale(name)
    return dset


def _attach(dset: h5py.Dataset, *scales: h5py.Dataset) -> None:
    for axis, scale in enumerate(scales):
        dset.dims[axis].attach_scale(scale)


def _write_prompt_group(fh: h5py.File, rows: list[list[int]]) -> None:
    group = fh.create_group("prompts")
    scale = _scale(group, "prompt", np.arange(len(rows), dtype=np.int64))
    _attach(group.create_dataset("length", data=np.asarray([len(r) for r in rows], dtype=np.int32)), scale)
    hashes = np.asarray([ids_sha256(r) for r in rows], dtype=object)
    _attach(group.create_dataset("ids_sha256", data=hashes, dtype=h5py.string_dtype()), scale)


def ids_sha256(ids: list[int]) -> str:
    """Return the sha256 of a token-id sequence (as little-endian int64)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def _write_batches(path: Path, plan: CapturePlan, model: LoadedModel, *, start: int, progress: bool) -> None:
    pairs = forward_order([(layer, site) for layer in plan.layers for site in plan.spec.sites])
    row = sum(len(p) for p in plan.picks[:start])
    layer_count = len(plan.layers)
    # A cache with room for one partly filled chunk per layer lets the next batch finish
    # it in memory; w0=1 evicts fully written chunks first.
    cache = 2 * layer_count * CHUNK_BYTES
    bar = tqdm(total=len(plan.batches), initial=start, desc=f"capture {plan.identity['model']}", unit="batch",
               disable=not progress, leave=False)
    with h5py.File(path, "r+", rdcc_nbytes=cache, rdcc_nslots=10007, rdcc_w0=1.0) as fh:
        for index in range(start, len(plan.batches)):
            picks = plan.picks[index]
            if picks:
                values = trace_batch(model, plan.batches[index], picks, pairs)
                for site in plan.spec.sites:
                    fh[site][row:row + len(picks)] = values[site]
            row += len(picks)
            for site in plan.spec.sites:
                fh[site].attrs[f"{ATTR}rows_written"] = row
            fh.attrs[f"{ATTR}batches_done"] = index + 1
            # Flushing after every batch keeps the file readable up to the last
            # finished batch if the process dies.
            fh.flush()
            bar.update(1)
        fh.attrs[f"{ATTR}complete"] = 1
    bar.close()


def trace_batch(model: LoadedModel, batch: Batch, picks: list[tuple[int, int]],
                pairs: list[tuple[int, str]]) -> dict[str, np.ndarray]:
    """Run one batch under a trace; return ``site -> [token, layer, width]`` float32 arrays.

    ``pairs`` must be in forward order. The selected tokens are gathered on the device,
    so only ``len(picks)`` vectors per (layer, site) travel back.
    """
    import nnsight

    # NOTE: tested locally and under nnsight's remote="local" simulation, not on NDIF.
    device = model.device
    rows = torch.tensor([r for r, _ in picks], dtype=torch.long, device=device)
    cols = torch.tensor([c for _, c in picks], dtype=torch.long, device=device)
    with torch.no_grad(), model.lm.trace(batch.model_inputs(), **model.trace_kwargs()) as tracer:
        gathered = []
        for layer, site in pairs:
            value = read_site(model, layer, site)
            gathered.append(value[rows, cols].detach().to(torch.float32))
        gathered = nnsight.save(gathered)
        # Nothing after the last requested site is needed, so the rest of the forward is skipped.
        tracer.stop()
    by_site: dict[str, list[torch.Tensor]] = {}
    for (_, site), value in zip(pairs, gathered):
        by_site.setdefault(site, []).append(value)
    return {site: torch.stack(values, dim=1).cpu().numpy() for site, values in by_site.items()}


# -- reading -------------------------------------------------------------------------


def check_capture(path: str | Path) -> dict:
    """Check that ``path`` is a complete, structurally sound capture; return its attributes.

    Raises:
        StoreError: the file is missing, unreadable (corrupt or truncated), not a
            capture, unfinished, or has fewer rows written than it declares.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"capture file {str(path)!r} not found")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: _text(v) for k, v in fh.attrs.items()}
            if attrs.get(f"{ATTR}kind") != KIND:
                raise StoreError(f"{path} is not a mechme capture file (kind {attrs.get(f'{ATTR}kind')!r})")
            sites = json.loads(attrs[f"{ATTR}sites"])
            n_tokens = int(attrs[f"{ATTR}n_tokens"])
            if int(attrs[f"{ATTR}complete"]) != 1:
                raise StoreError(
                    f"{path} is an unfinished capture ({attrs[f'{ATTR}batches_done']} of "
                    f"{attrs[f'{ATTR}n_batches']} batches); rerun the same capture command to resume it"
                )
            for site in sites:
                if site not in fh:
                    raise StoreError(f"{path} is corrupt: dataset {site!r} is missing; delete it and capture again")
                dset = fh[site]
                written = int(dset.attrs.get(f"{ATTR}rows_written", -1))
                if dset.shape[0] != n_tokens or written != n_tokens:
                    raise StoreError(
                        f"{path} is corrupt: dataset {site!r} has {written} of {n_tokens} rows written "
                        f"(shape {dset.shape}); delete it and capture again"
                    )
    except OSError as err:
        raise StoreError(f"{path} is corrupt or truncated ({err}); delete it and capture again") from err
    except (KeyError, ValueError) as err:
        raise StoreError(f"{path} is not a valid mechme capture file ({err}); delete it and capture again") from err
    return attrs


def open_capture(path: str | Path, *, verify: bool = False) -> xr.Dataset:
    """Open a finished capture lazily as an ``xarray.Dataset`` (values load on access).

    Args:
        verify: read every chunk once, so a damaged chunk fails its checksum here
            rather than on first access.
    """
    check_capture(path)
    if verify:
        verify_capture(path)
    try:
        return xr.open_dataset(path, engine=runfile.ENGINE)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} is corrupt or not a capture file ({err}); delete it and capture again") from err


def verify_capture(path: str | Path) -> None:
    """Read every chunk of every site, one layer at a time, to check its checksum.

    Raises:
        StoreError: a chunk fails its Fletcher-32 checksum or cannot be decompressed.
    """
    attrs = check_capture(path)
    with h5py.File(path, "r") as fh:
        for site in json.loads(attrs[f"{ATTR}sites"]):
            dset = fh[site]
            for index in range(dset.shape[1]):
                _read(path, dset, (slice(None), index))


def _read(path, dset: h5py.Dataset, key) -> np.ndarray:
    try:
        return dset[key]
    except OSError as err:
        raise StoreError(
            f"{path} is corrupt: reading {dset.name.lstrip('/')!r} failed ({err}); delete it and capture again"
        ) from err


def describe_capture(path: str | Path) -> dict:
    """Return a summary of a finished capture: store, model, sites, layers, n_tokens, bytes."""
    attrs = check_capture(path)
    with h5py.File(path, "r") as fh:
        layers = [int(v) for v in fh["layer"][()]]
    return {
        "store": str(path),
        "model": attrs[f"{ATTR}model"],
        "sites": json.loads(attrs[f"{ATTR}sites"]),
        "layers": layers,
        "tokens": json.loads(attrs[f"{ATTR}tokens"]),
        "n_tokens": int(attrs[f"{ATTR}n_tokens"]),
        "bytes": int(attrs[f"{ATTR}bytes"]),
        "file_bytes": Path(path).stat().st_size,
    }


# -- patching ------------------------------------------------------------------------


def check_same_model(path: str | Path, model: LoadedModel, attrs: dict | None = None) -> None:
    """Raise `SpecError` unless the capture was made with ``model``'s weights and architecture."""
    attrs = attrs if attrs is not None else check_capture(path)
    info = json.loads(attrs[f"{ATTR}model_info"])
    mine = model.describe()
    keys = ("architecture", "n_layers", "d_model", "d_mlp")
    theirs_shape = {k: info.get(k) for k in keys}
    mine_shape = {k: mine[k] for k in keys}
    if theirs_shape != mine_shape:
        raise SpecError(
            f"capture {path} was made with {info.get('model')!r} ({_shape_text(theirs_shape)}), but this model "
            f"is {model.ref!r} ({_shape_text(mine_shape)}); capture again with --model {model.ref}"
        )
    stored = attrs.get(f"{ATTR}weights_sha256") or ""
    # NOTE: an ndif: model has no local weights hash, so only its reference can be compared.
    if not stored or not model.weights_sha256:
        if info.get("model") != model.ref:
            raise SpecError(
                f"capture {path} was made with {info.get('model')!r}, not {model.ref!r}, and has no weights "
                f"hash to compare; capture again with --model {model.ref}"
            )
        return
    if stored != model.weights_sha256:
        raise SpecError(
            f"capture {path} was made with weights sha256 {stored[:12]}... ({info.get('model')!r}), but "
            f"{model.ref!r} has weights sha256 {model.weights_sha256[:12]}...; capture again with this model"
        )


def _shape_text(shape: dict) -> str:
    return f"{shape['architecture']}, {shape['n_layers']} layers, d={shape['d_model']}, d_mlp={shape['d_mlp']}"


def load_patch(
    path: str | Path,
    model: LoadedModel,
    *,
    site: str,
    layer: int,
    prompt: int | str,
    position: int = 0,
) -> torch.Tensor:
    """Return a captured state to patch into ``model``: ``[width]`` float32 on its device.

    Args:
        path: a finished capture file.
        model: the model the patch goes into; it must have the capture's weights.
        site: a captured site.
        layer: a captured layer.
        prompt: the prompt's index in the capture, or its text (matched by token ids,
            tokenized as the capture tokenized its prompts).
        position: real-token position within the prompt (0 is the first real token).

    Raises:
        SpecError: the capture comes from another model, or the site, layer, prompt or
            position was not captured.
        StoreError: the file is unfinished, corrupt or truncated.
    """
    attrs = check_capture(path)
    check_same_model(path, model, attrs)
    sites = json.loads(attrs[f"{ATTR}sites"])
    if site not in sites:
        raise SpecError(f"site {site!r} is not in capture {path}; it contains {', '.join(sites)}")
    spec = json.loads(attrs[f"{ATTR}spec"])
    with h5py.File(path, "r") as fh:
        layers = [int(v) for v in fh["layer"][()]]
        if layer not in layers:
            raise SpecError(f"layer {layer!r} is not in capture {path}; it contains layers {format_layers(layers)}")
        index = _prompt_index(fh, path, prompt, model, spec)
        row = _row_of(fh, path, index, position)
        value = _read(path, fh[site], (row, layers.index(layer)))
    if np.isnan(value).any():
        raise StoreError(f"{path} is corrupt: {site} at prompt {index}, layer {layer} contains NaN (never written)")
    return torch.from_numpy(value).to(model.device)


def _prompt_index(fh: h5py.File, path, prompt: int | str, model: LoadedModel, spec: dict) -> int:
    hashes = [_text(h) for h in fh["prompts/ids_sha256"][()]]
    if isinstance(prompt, str):
        ids = model.tokenizer(prompt).input_ids[: int(spec["seq_len"])]
        digest = ids_sha256(ids)
        if digest not in hashes:
            raise SpecError(
                f"prompt {prompt[:60]!r} is not among the {len(hashes)} prompts of capture {path}; "
                "pass a prompt index or capture this prompt"
            )
        return hashes.index(digest)
    if not 0 <= int(prompt) < len(hashes):
        raise SpecError(f"prompt {prompt!r} is out of range; capture {path} has prompts 0..{len(hashes) - 1}")
    return int(prompt)


def _row_of(fh: h5py.File, path, prompt: int, position: int) -> int:
    # "prompt" is the row axis in the first-token layout and a per-token coordinate in
    # the flat layout; both give the prompt index of each row.
    prompts = fh["prompt"][()]
    positions = fh["position"][()]
    matches = np.flatnonzero((prompts == prompt) & (positions == position))
    if matches.size == 0:
        captured = positions[prompts == prompt].tolist()
        raise SpecError(
            f"position {position} of prompt {prompt} is not in capture {path}; captured positions of this "
            f"prompt: {captured}"
        )
    return int(matches[0])


def format_layers(values: list[int]) -> str:
    """Format layers compactly: ``0-29`` for a contiguous run, else ``3,5,7``."""
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(str(v) for v in values)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
