"""Compile study specs against a loaded model: validate, resolve selectors, apply edits.

Compilation happens before anything runs, so a bad spec fails with a message that lists
the valid values. Activation edits are applied inside the trace with torch operations
only. Weight edits (module and neuron swaps) are applied to the local model and undone
when the condition ends.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass, field

import torch

from mechme.engine.sites import read_site
from mechme.engine.text import Batch
from mechme.errors import SpecError
from mechme.models.architectures import NORM_ROLES, SITES
from mechme.models.loaded import LoadedModel
from mechme.specs.core import (
    WEIGHT_OPS,
    Condition,
    Dims,
    Intervention,
    Mean,
    Noise,
    Replace,
    Scale,
    SetGain,
    SwapModules,
    SwapNeurons,
    Tokens,
    Zero,
)

DELIMITER_CHARS = set(string.punctuation) | {"\n"}


@dataclass
class Context:
    """Inputs that selectors may depend on: the model, and the ME Layer and massive dims of a scan."""

    model: LoadedModel
    me_layer: int | None = None
    massive_dims: tuple[int, ...] = ()
    calibration: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (layer, site) -> mean
    replacements: dict[tuple[str, int, str, int], torch.Tensor] = field(default_factory=dict)


@dataclass
class ActEdit:
    """One activation edit at (layer, site), ready to apply inside a trace."""

    layer: int
    site: str  # a canonical site, or "norm:<role>" for SetGain
    intervention: Intervention
    dims: torch.Tensor | None  # None: all dims, or chosen per token in the trace (act_top)
    new_gain: torch.Tensor | None = None  # SetGain: the effective gain to emulate on the dims


def validate_condition(condition: Condition, ctx: Context) -> None:
    """Check every intervention of ``condition`` against the model (no forward pass)."""
    model = ctx.model
    for iv in condition.interventions:
        for layer in iv.layers:
            model.check_layer(layer)
        if isinstance(iv.op, SetGain):
            if iv.site not in model.arch.norms:
                raise SpecError(
                    f"SetGain needs a norm role as its site, got {iv.site!r}; "
                    f"this model has {', '.join(model.arch.norms)} (all roles: {', '.join(NORM_ROLES)})"
                )
        elif isinstance(iv.op, WEIGHT_OPS):
            _validate_weight_op(iv, model)
        else:
            model.check_site(iv.site)
        if isinstance(iv.op, Replace) and iv.tokens.kind not in ("first", "positions"):
            raise SpecError(f"Replace takes the source state at first or explicit positions, not {iv.tokens.kind!r}")
        if isinstance(iv.op, Noise) and iv.op.std < 0:
            raise SpecError(f"Noise std must be non-negative, got {iv.op.std}")
        width = _width(iv, model)
        for layer in iv.layers:
            resolve_dims(iv.dims, iv, layer, ctx, width)


def _width(iv: Intervention, model: LoadedModel) -> int:
    if isinstance(iv.op, SetGain):
        return model.d_model
    if isinstance(iv.op, SwapNeurons):
        return model.d_mlp
    if isinstance(iv.op, SwapModules):
        return model.d_model
    return model.site_width(iv.site)


def _validate_weight_op(iv: Intervention, model: LoadedModel) -> None:
    if model.remote is not None:
        raise SpecError(f"{type(iv.op).__name__} edits weights, which only works on a local model, not remote={model.remote!r}")
    if iv.op.other_layer is not None:
        model.check_layer(iv.op.other_layer)
    if isinstance(iv.op, SwapNeurons):
        if not iv.op.pairs:
            raise SpecError("SwapNeurons needs pairs=((i, j), ...) of neurons to exchange")
        for a, b in iv.op.pairs:
            for n in (a, b):
                if not 0 <= n < model.d_mlp:
                    raise SpecError(f"neuron {n} is out of range; this model has neurons 0..{model.d_mlp - 1}")
        if iv.op.other_layer is None and iv.op.checkpoint is None:
            raise SpecError("SwapNeurons needs other_layer or checkpoint")


def resolve_dims(dims: Dims, iv: Intervention, layer: int, ctx: Context, width: int) -> torch.Tensor | None:
    """Return the dim indices a selector picks (None for all, or for per-token act_top)."""
    model = ctx.model
    if dims.kind == "all":
        return None
    if dims.kind == "act_top":
        _count(dims, width)
        return None
    if dims.kind == "explicit":
        chosen = list(dims.dims)
    elif dims.kind == "massive":
        if not ctx.massive_dims:
            raise SpecError("Dims.massive() selects nothing: the scan found no massive dims in this model and text")
        chosen = list(ctx.massive_dims)
    else:  # gain_top
        gain_layer = dims.layer if dims.layer is not None else layer
        model.check_layer(gain_layer)
        gain = model.effective_gain(gain_layer, dims.role)
        k = _count(dims, gain.numel())
        chosen = gain.abs().topk(k).indices.tolist()
    bad = [d for d in chosen if not 0 <= d < width]
    if bad:
        raise SpecError(f"dims {bad} are out of range at site {iv.site!r}; valid dims are 0..{width - 1}")
    return torch.tensor(sorted(set(chosen)), dtype=torch.long)


def _count(dims: Dims, width: int) -> int:
    k = dims.k if dims.k is not None else int(dims.fraction * width)
    if k < 1:
        raise SpecError(
            f"Dims fraction {dims.fraction} of {width} dims rounds to 0 dims, so it would select nothing; "
            f"use a fraction of at least {1 / width:.4g} or k=1"
        )
    return min(k, width)


def token_positions(tokens: Tokens, batch: Batch, token_strings: list[list[str]]) -> list[tuple[int, int]]:
    """Return (row, padded position) pairs that a token selector picks in a batch."""
    picked = []
    for row, (pad, length) in enumerate(zip(batch.n_pad, batch.lengths)):
        if tokens.kind == "first":
            real = [0]
        elif tokens.kind == "all":
            real = list(range(length))
        elif tokens.kind == "positions":
            real = [p if p >= 0 else length + p for p in tokens.positions]
            real = [p for p in real if 0 <= p < length]
        else:
            strings = token_strings[row]
            real = [p for p, s in enumerate(strings) if _is_delimiter(s)]
        picked.extend((row, pad + p) for p in real)
    return picked


def _is_delimiter(token: str) -> bool:
    text = token.replace("Ġ", "").replace("▁", "").replace("Ċ", "\n").strip(" ")
    return bool(text) and all(ch in DELIMITER_CHARS for ch in text)


def compile_condition(condition: Condition, ctx: Context) -> list[ActEdit]:
    """Return the activation edits of a condition in forward order (weight ops excluded)."""
    validate_condition(condition, ctx)
    edits = []
    for iv in condition.interventions:
        if isinstance(iv.op, WEIGHT_OPS):
            continue
        for layer in iv.layers:
            dims = resolve_dims(iv.dims, iv, layer, ctx, _width(iv, ctx.model))
            if isinstance(iv.op, SetGain):
                gain = ctx.model.effective_gain(layer, iv.site)
                new = _new_gain(iv.op, gain)
                edits.append(ActEdit(layer, f"norm:{iv.site}", iv, dims, new_gain=new))
            else:
                edits.append(ActEdit(layer, iv.site, iv, dims))
    return sorted(edits, key=lambda e: (e.layer, _site_order(e.site)))


def _site_order(site: str) -> float:
    if site.startswith("norm:"):
        role = site.split(":", 1)[1]
        # A gain edit reads the norm's input, so it goes just before the site that the
        # norm's output feeds: a trace cannot return to an input once the module has run.
        return {"attn_norm": 1, "attn_post_norm": 2, "mlp_norm": 4, "mlp_post_norm": 6}[role] - 0.5
    return SITES.index(site)


def _new_gain(op: SetGain, gain: torch.Tensor) -> torch.Tensor:
    if op.to == "mean":
        return torch.full_like(gain, float(gain.mean()))
    if op.to == "identity":
        return torch.ones_like(gain)
    if op.to == "zero":
        return torch.zeros_like(gain)
    return gain * op.factor


def apply_edit(edit: ActEdit, ctx: Context, batch: Batch, token_strings: list[list[str]],
               row_offset: int = 0, reads: dict | None = None) -> torch.Tensor:
    """Apply one activation edit inside an active trace; return the edited site value.

    ``row_offset`` places ``batch`` at rows ``row_offset ..`` of a trace that stacks one
    copy of it per condition, and only those rows are edited. Edits of several
    conditions at one site share ``reads``, so the site is read once.
    """
    model = ctx.model
    iv = edit.intervention
    picks = token_positions(iv.tokens, batch, token_strings)
    reads = {} if reads is None else reads
    key = (edit.layer, edit.site)
    if edit.site.startswith("norm:"):
        if key not in reads:
            envoy = model.envoy(edit.layer, model.arch.norms[edit.site.split(":", 1)[1]])
            reads[key] = (envoy.input, envoy.output)
        return _apply_gain(edit, ctx, picks, reads[key], row_offset, len(batch.n_pad))
    if key not in reads:
        reads[key] = read_site(model, edit.layer, edit.site)
    value = reads[key]
    for i, (row, col) in enumerate(picks):
        dims = edit.dims
        at = row + row_offset
        if iv.dims.kind == "act_top":
            k = _count(iv.dims, value.shape[-1])
            dims = value[at, col].detach().abs().topk(k).indices
        old = value[at, col] if dims is None else value[at, col, dims]
        new = _op_value(iv, old, ctx, edit, batch, i, row, col - batch.n_pad[row], dims)
        if dims is None:
            value[at, col] = new
        else:
            value[at, col, dims] = new
    return value


def _op_value(iv, old, ctx, edit, batch, i, row, position, dims):
    op = iv.op
    if isinstance(op, Zero):
        return torch.zeros_like(old)
    if isinstance(op, Scale):
        return old * op.factor
    if isinstance(op, Mean):
        mean = ctx.calibration[(edit.layer, edit.site)].to(old.dtype)
        return mean if dims is None else mean[dims]
    if isinstance(op, Noise):
        gen = torch.Generator().manual_seed(hash((op.seed, batch.index, edit.layer, i)) % (2**63))
        return old + op.std * torch.randn(old.shape, generator=gen, dtype=torch.float32).to(old.dtype)
    if isinstance(op, Replace):
        key = (op.prompt, edit.layer, edit.site, _source_position(iv.tokens, position))
        source = ctx.replacements[key].to(old.dtype)
        return source if dims is None else source[dims]
    raise SpecError(f"op {type(op).__name__} cannot be applied to an activation")


def _source_position(tokens: Tokens, position: int) -> int:
    return 0 if tokens.kind == "first" else position


def _apply_gain(edit: ActEdit, ctx: Context, picks, io, row_offset: int = 0, n_rows: int | None = None) -> torch.Tensor:
    """Rewrite a norm's output on the selected dims as if its gain were ``edit.new_gain``.

    RMSNorm computes ``gain * x / sqrt(mean(x^2) + eps)``. The edit recomputes the
    normalised input from the norm's own input, so it is exact even where the old gain
    is 0, as SmolLM2's gain at its massive dim nearly is.
    """
    model = ctx.model
    role = edit.site.split(":", 1)[1]
    x, out = io
    eps = model.norm_eps(edit.layer, role)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    dims = edit.dims if edit.dims is not None else torch.arange(model.d_model)
    new = (normed[..., dims] * edit.new_gain[dims]).to(out.dtype)
    if edit.intervention.tokens.kind == "all":
        if row_offset == 0 and (n_rows is None or n_rows == out.shape[0]):
            out[..., dims] = new
        else:
            rows = slice(row_offset, row_offset + n_rows)
            out[rows, :, dims] = new[rows]
    else:
        for row, col in picks:
            out[row + row_offset, col, dims] = new[row + row_offset, col]
    return out


def has_weight_ops(condition: Condition) -> bool:
    """Return whether the condition edits weights (module or neuron swaps)."""
    return any(isinstance(iv.op, WEIGHT_OPS) for iv in condition.interventions)


@contextlib.contextmanager
def weight_edits(condition: Condition, ctx: Context):
    """Apply the condition's weight ops to the local model and restore them on exit."""
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    model = ctx.model
    try:
        with torch.no_grad():
            for iv in condition.interventions:
                if isinstance(iv.op, SwapModules):
                    for layer in iv.layers:
                        _swap_modules(model, layer, iv.op, saved)
                elif isinstance(iv.op, SwapNeurons):
                    for layer in iv.layers:
                        _swap_neurons(model, layer, iv.op, saved)
        yield
    finally:
        with torch.no_grad():
            for param, original in reversed(saved):
                param.copy_(original)


def _params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(module.named_parameters())


def _other_layer_module(model: LoadedModel, layer: int, op, path: str) -> torch.nn.Module:
    if op.checkpoint is not None:
        other = _load_checkpoint(op.checkpoint, model)
        return other.submodule(layer, path)
    return model.submodule(op.other_layer, path)


_CHECKPOINTS: dict[str, LoadedModel] = {}


def _load_checkpoint(ref: str, model: LoadedModel) -> LoadedModel:
    from mechme.models.loading import load_model

    if ref not in _CHECKPOINTS:
        _CHECKPOINTS[ref] = load_model(ref)
    other = _CHECKPOINTS[ref]
    if other.arch.name != model.arch.name or other.n_layers != model.n_layers or other.d_model != model.d_model:
        raise SpecError(
            f"checkpoint {ref!r} ({other.arch.name}, {other.n_layers} layers, d={other.d_model}) does not match "
            f"{model.ref!r} ({model.arch.name}, {model.n_layers} layers, d={model.d_model})"
        )
    return other


def _swap_modules(model: LoadedModel, layer: int, op: SwapModules, saved) -> None:
    paths = []
    if op.part in ("mlp", "both"):
        paths.append("mlp")
    if op.part in ("norm", "both"):
        role = "mlp_norm" if "mlp_norm" in model.arch.norms else "mlp_post_norm"
        paths.append(model.arch.norms[role])
    for path in paths:
        mine = _params(model.submodule(layer, path))
        theirs = _params(_other_layer_module(model, layer, op, path))
        for name, param in mine.items():
            other = theirs[name]
            saved.append((param, param.detach().clone()))
            if op.other_layer is not None:
                saved.append((other, other.detach().clone()))
                mine_value = param.detach().clone()
                param.copy_(other)
                other.copy_(mine_value)
            else:
                param.copy_(other)


def _swap_neurons(model: LoadedModel, layer: int, op: SwapNeurons, saved) -> None:
    layout = model.arch.mlp
    down = model.submodule(layer, layout.down).weight
    same_layer = op.checkpoint is None and op.other_layer == layer
    if same_layer:
        # A whole-neuron swap inside one layer is a permutation; exchange down columns only.
        saved.append((down, down.detach().clone()))
        for a, b in op.pairs:
            col = down[:, a].clone()
            down[:, a] = down[:, b]
            down[:, b] = col
        return
    other_down = _other_layer_module(model, layer, op, layout.down).weight
    rows = [layout.gate_up] if layout.gate_up else [layout.gate, layout.up]
    pairs_in = [(model.submodule(layer, p).weight, _other_layer_module(model, layer, op, p).weight) for p in rows]
    for mine, theirs in [(down, other_down)] + pairs_in:
        saved.append((mine, mine.detach().clone()))
        if op.checkpoint is None:
            saved.append((theirs, theirs.detach().clone()))
    d_mlp = model.d_mlp
    for a, b in op.pairs:
        _exchange(down, other_down, (slice(None), a), (slice(None), b), op.checkpoint is None)
        for mine, theirs in pairs_in:
            offsets = (0, d_mlp) if layout.gate_up else (0,)
            for off in offsets:
                _exchange(mine, theirs, (a + off,), (b + off,), op.checkpoint is None)


def _exchange(mine, theirs, index_a, index_b, both_ways: bool) -> None:
    value = mine[index_a].clone()
    mine[index_a] = theirs[index_b]
    if both_ways:
        theirs[index_b] = value
