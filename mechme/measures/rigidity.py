"""Rigidity of the massive token's state and diversity of the attention input.

Two measures, streamed one layer at a time inside an nnsight trace and reduced there
with torch operations, so only a few numbers per prompt and layer leave the device:

- **Rigidity** reads ``resid_post`` at the first real token (position 0, where the
  massive activation sits) and, for contrast, at every other real token ("ordinary"
  tokens). Per layer it reports the cosine with the same token's state one layer
  earlier (``resid_pre`` of layer 0 for layer 0), the mean pairwise cosine across
  prompts, and the mean norm.
- **Diversity** reads ``attn_in`` (the attention input after its norm). Per prompt
  and layer it reports the mean pairwise cosine between the prompt's real tokens and
  the effective rank of the ``[tokens, dim]`` matrix, each with and without position 0.
  The effective rank is ``exp`` of the Shannon entropy of the singular values divided
  by their sum. Rows are not mean-centred.

Both run a baseline and then each condition, applying the condition's edits as
`mechme.engine.study.trace_condition` does. The condition and text plumbing that
`mechme.measures.sinks` shares lives here too.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from mechme.engine.compile import ActEdit, Context, _site_order, apply_edit, compile_condition, weight_edits
from mechme.engine.scan import ScanSpec, resolve_rows, scan
from mechme.engine.sites import read_site
from mechme.engine.study import BASELINE, _calibrate, _prepare_replacements
from mechme.engine.text import Batch, make_batches, pad_id
from mechme.errors import SpecError
from mechme.models.architectures import SITES
from mechme.models.loaded import LoadedModel
from mechme.models.loading import load_model
from mechme.specs.core import Condition, to_dict
from mechme.store import runfile

ATTENTION_WEIGHTS = "attn_weights"
"""Pseudo-site: the attention probabilities ``[batch, head, query, key]`` of a layer."""


# -- text, conditions and layer stepping (shared with sinks) -------------------------


def prepare_text(model: LoadedModel, *, prompts: str, text: str | None, seq_len: int,
                 max_tokens: int | None, batch_size: int) -> dict:
    """Tokenize the text source and cut it into left-padded batches.

    Returns:
        A dict with ``source``, ``text_sha256``, ``rows``, ``batches`` and ``strings``
        (the token strings of each row, which delimiter selectors need).
    """
    spec = ScanSpec(prompts=prompts, text=text, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    source, text_sha, rows = resolve_rows(spec, model.tokenizer)
    return {
        "source": source,
        "text_sha256": text_sha,
        "rows": rows,
        "batches": make_batches(rows, batch_size=batch_size, pad=pad_id(model.tokenizer)),
        "strings": [model.tokenizer.convert_ids_to_tokens(r) for r in rows],
    }


def check_conditions(conditions) -> tuple[Condition, ...]:
    """Validate the condition list's types and names; the baseline is added by the caller."""
    conditions = tuple(conditions)
    for c in conditions:
        if not isinstance(c, Condition):
            raise SpecError(f"conditions must be mechme.specs.Condition objects, got {c!r}")
    names = [c.name for c in conditions]
    if "baseline" in names:
        raise SpecError("the condition name 'baseline' is reserved for the unedited run; rename it")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"duplicate condition names: {', '.join(dupes)}")
    return conditions


def find_me_layer(model: LoadedModel, options: dict) -> dict:
    """Scan the same text for massive activations and return the scan's verdict."""
    spec = ScanSpec(
        model=model.ref, prompts=options["prompts"], text=options["text"], seq_len=options["seq_len"],
        max_tokens=options["max_tokens"], batch_size=options["batch_size"],
        dtype=str(model.dtype).removeprefix("torch."),
    )
    return scan(spec, model=model, out=None, progress=False).verdict


def prepare_conditions(model: LoadedModel, conditions: tuple[Condition, ...], verdict: dict,
                       text: dict) -> tuple[Context, dict[str, list[ActEdit]]]:
    """Build the selector context and compile the baseline and each condition.

    Mean ops get their calibration and Replace ops their source states here, by the
    same helpers `mechme.engine.study.run_study` uses.
    """
    ctx = Context(model=model, me_layer=verdict.get("me_layer"),
                  massive_dims=tuple(verdict.get("massive_dims", ())[:4]))
    holder = types.SimpleNamespace(conditions=conditions)
    compiled = {c.name: compile_condition(c, ctx) for c in (BASELINE, *conditions)}
    _calibrate(holder, ctx, text["batches"], text["strings"])
    _prepare_replacements(holder, ctx)
    return ctx, compiled


def edits_by_layer(edits: list[ActEdit]) -> dict[int, list[ActEdit]]:
    grouped: dict[int, list[ActEdit]] = {}
    for edit in edits:
        grouped.setdefault(edit.layer, []).append(edit)
    return grouped


def _read_order(site: str) -> float:
    # A read comes after any edit of the same module's output: edits of a canonical site
    # sort at its index and norm-gain edits at index + 0.5 (see compile._site_order).
    if site == ATTENTION_WEIGHTS:
        return SITES.index("attn_in") + 0.8
    return SITES.index(site) + 0.6


def read_attention_weights(model: LoadedModel, layer: int):
    """Return the attention probabilities of ``layer`` inside an active trace.

    With eager attention, the attention module of every supported architecture returns
    ``(attn_output, attn_weights)`` with weights ``[batch, head, query, key]``
    (transformers 5.25); other implementations return None there.
    """
    weights = model.envoy(layer, model.arch.attention).output[1]
    if weights is None:
        raise SpecError(
            f"layer {layer} of {model.ref} returned no attention weights; eager attention is required "
            "(load the model with attn_implementation='eager')"
        )
    return weights


def step_layer(ctx: Context, layer: int, edits: list[ActEdit], sites: tuple[str, ...], batch: Batch,
               strings: list[list[str]]) -> dict[str, torch.Tensor]:
    """Apply one layer's edits and read ``sites`` of it, all in forward order.

    Call inside an active trace, layer after layer. A site that an edit changes is read
    after the edit, so the measure reads the edited value.
    """
    steps = [(_site_order(e.site), 0, i) for i, e in enumerate(edits)]
    steps += [(_read_order(s), 1, i) for i, s in enumerate(sites)]
    edited: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for _, is_read, i in sorted(steps):
        if not is_read:
            edit = edits[i]
            edited[edit.site] = apply_edit(edit, ctx, batch, strings)
        elif sites[i] == ATTENTION_WEIGHTS:
            values[sites[i]] = read_attention_weights(ctx.model, layer)
        elif sites[i] in edited:
            values[sites[i]] = edited[sites[i]]
        else:
            values[sites[i]] = read_site(ctx.model, layer, sites[i])
    return values


def first_index(batch: Batch) -> torch.Tensor:
    """Return the padded index of each row's first real token (position 0)."""
    return torch.tensor(batch.n_pad, dtype=torch.long)


# -- reductions (torch only, so they run inside a trace) --------------------------------


def mean_pairwise_cosine(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Compute the mean cosine over distinct pairs of the masked rows of each ``[tokens, dim]`` matrix.

    Uses ``sum_{i != j} cos(x_i, x_j) = |sum_i u_i|^2 - n`` for unit rows ``u_i``, so
    it costs one pass. Returns NaN for a prompt with fewer than two masked rows.
    """
    u = torch.nn.functional.normalize(x.double(), dim=-1) * mask.unsqueeze(-1)
    n = mask.double().sum(-1)
    total = u.sum(-2).pow(2).sum(-1)
    return ((total - n) / (n * (n - 1))).float()


def effective_rank(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Compute the effective rank of each ``[tokens, dim]`` matrix restricted to its masked rows.

    Masked-out rows are zeroed, which leaves the non-zero singular values unchanged.
    """
    s = torch.linalg.svdvals(x.double() * mask.unsqueeze(-1))
    p = s / s.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).float()


def reduce_diversity(x: torch.Tensor, real: torch.Tensor, first: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute the diversity of one layer's attention input, per prompt, with and without position 0."""
    rows = torch.arange(x.shape[0])
    without = real.clone()
    without[rows, first] = False
    return {
        "mean_cos": mean_pairwise_cosine(x, real),
        "mean_cos_without_first": mean_pairwise_cosine(x, without),
        "erank": effective_rank(x, real),
        "erank_without_first": effective_rank(x, without),
    }


def reduce_rigidity(h: torch.Tensor, prev: torch.Tensor, real: torch.Tensor,
                    first: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute rigidity statistics of one layer's ``resid_post`` per prompt, against the layer before.

    Returns per-prompt values and the sums of unit vectors that the cross-prompt mean
    cosine needs, so that mean can be finished exactly after the last batch.
    """
    h = h.detach().float()
    prev = prev.detach().float()
    rows = torch.arange(h.shape[0])
    unit = torch.nn.functional.normalize(h, dim=-1)
    unit_prev = torch.nn.functional.normalize(prev, dim=-1)
    cos_prev = (unit * unit_prev).sum(-1)  # [batch, token]
    norms = h.norm(dim=-1)

    other = real.clone()
    other[rows, first] = False
    count = other.float().sum(-1)
    prompt_sums = (unit * other.unsqueeze(-1)).double().sum(1)  # [batch, dim]
    return {
        "first_cos_prev": cos_prev[rows, first],
        "first_norm": norms[rows, first],
        "first_unit_sum": unit[rows, first].double().sum(0),
        "other_cos_prev": (cos_prev * other).sum(-1) / count,
        "other_norm": (norms * other).sum(-1) / count,
        "other_count": count,
        "other_sum_sq": prompt_sums.pow(2).sum(-1),
        "other_unit_sum": prompt_sums.sum(0),
    }


# -- the measure -------------------------------------------------------------------------


def trace_rigidity(ctx: Context, edits: list[ActEdit], batch: Batch, strings) -> dict[str, np.ndarray]:
    """Run one condition on one batch; return ``[layer, ...]`` arrays of rigidity and diversity."""
    import nnsight

    model = ctx.model
    real = batch.attention_mask.bool()
    first = first_index(batch)
    edit_at = edits_by_layer(edits)
    with torch.no_grad(), model.lm.trace(batch.model_inputs(), **model.trace_kwargs()):
        per_layer = []
        prev = None
        for layer in range(model.n_layers):
            sites = ("attn_in", "resid_post") if layer else ("resid_pre", "attn_in", "resid_post")
            values = step_layer(ctx, layer, edit_at.get(layer, []), sites, batch, strings)
            if prev is None:
                prev = values["resid_pre"]
            stats = reduce_rigidity(values["resid_post"], prev, real, first)
            stats.update(reduce_diversity(values["attn_in"].detach().float(), real, first))
            per_layer.append(stats)
            prev = values["resid_post"]
        saved = nnsight.save(per_layer)
    return {key: torch.stack([s[key] for s in saved]).cpu().numpy() for key in saved[0]}


def _cross_prompt_cosines(parts: list[dict], n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Finish the mean pairwise cosines across prompts from the per-batch unit-vector sums."""
    first_sum = sum(p["first_unit_sum"] for p in parts)  # [layer, dim]
    first = ((first_sum**2).sum(-1) - n_prompts) / (n_prompts * (n_prompts - 1)) if n_prompts > 1 else None
    other_sum = sum(p["other_unit_sum"] for p in parts)
    same_prompt = sum(p["other_sum_sq"].sum(-1) for p in parts)  # pairs within one prompt, and i == j
    counts = np.concatenate([p["other_count"] for p in parts], axis=1)[0]
    cross_pairs = counts.sum() ** 2 - (counts**2).sum()
    other = ((other_sum**2).sum(-1) - same_prompt) / cross_pairs if cross_pairs > 0 else None
    layers = first_sum.shape[0]
    nan = np.full(layers, np.nan)
    return (nan if first is None else first), (nan if other is None else other)


def assemble_rigidity(results: dict[str, list[dict]], rows: list[list[int]], model: LoadedModel) -> xr.Dataset:
    """Build the Dataset (dims condition, layer, prompt) from per-batch results."""
    names = list(results)
    n_prompts = len(rows)
    per_prompt = ("first_cos_prev", "first_norm", "other_cos_prev", "other_norm",
                  "mean_cos", "mean_cos_without_first", "erank", "erank_without_first")
    data = {}
    for key in per_prompt:
        stacked = np.stack([np.concatenate([p[key] for p in results[n]], axis=1) for n in names])
        data[key] = (("condition", "layer", "prompt"), stacked.astype(np.float32))

    across = [_cross_prompt_cosines(results[n], n_prompts) for n in names]
    data["first_cos_across_prompts"] = (("condition", "layer"), np.stack([a[0] for a in across]).astype(np.float32))
    data["other_cos_across_prompts"] = (("condition", "layer"), np.stack([a[1] for a in across]).astype(np.float32))
    data["prompt_length"] = (("prompt",), np.array([len(r) for r in rows], dtype=np.int32))

    first_tokens = np.array(model.tokenizer.convert_ids_to_tokens([r[0] for r in rows]), dtype=str)
    ds = xr.Dataset(data, coords={
        "condition": names, "layer": np.arange(model.n_layers), "prompt": np.arange(n_prompts),
        "first_token": (("prompt",), first_tokens),
    })

    descriptions = {
        "first_cos_prev": "cosine of resid_post at position 0 with the same token one layer earlier",
        "first_norm": "L2 norm of resid_post at position 0",
        "first_cos_across_prompts": "mean pairwise cosine of resid_post at position 0 across prompts",
        "other_cos_prev": "mean over positions >= 1 of the cosine with the same token one layer earlier",
        "other_norm": "mean L2 norm of resid_post over positions >= 1",
        "other_cos_across_prompts": "mean cosine over pairs of positions >= 1 from different prompts",
        "mean_cos": "mean pairwise cosine between the real tokens of attn_in",
        "mean_cos_without_first": "mean pairwise cosine between the real tokens of attn_in, position 0 left out",
        "erank": "effective rank of attn_in over the real tokens (exp of singular-value entropy)",
        "erank_without_first": "effective rank of attn_in, position 0 left out",
    }
    for key, text in descriptions.items():
        ds[key].attrs["description"] = text
    return ds


def summarize_rigidity(ds: xr.Dataset) -> dict:
    """Return the per-layer numbers of each condition as plain JSON types."""
    me = int(ds.attrs.get("mechme_me_layer", -1))

    def number(value) -> float | None:
        value = float(value)
        return None if np.isnan(value) else value

    def one(name: str) -> dict:
        sel = ds.sel(condition=name)
        layers, diversity = [], []
        for layer in ds.layer.values:
            at = sel.sel(layer=layer)
            layers.append({
                "layer": int(layer),
                "cos_prev": number(at.first_cos_prev.mean()),
                "cos_across_prompts": number(at.first_cos_across_prompts),
                "norm": number(at.first_norm.mean()),
                "ordinary": {
                    "cos_prev": number(at.other_cos_prev.mean()),
                    "cos_across_prompts": number(at.other_cos_across_prompts),
                    "norm": number(at.other_norm.mean()),
                },
            })
            diversity.append({
                "layer": int(layer),
                "mean_cos": number(at.mean_cos.mean()),
                "erank": number(at.erank.mean()),
                "mean_cos_without_massive": number(at.mean_cos_without_first.mean()),
                "erank_without_massive": number(at.erank_without_first.mean()),
            })
        out = {"layers": layers, "diversity": diversity}
        if 0 <= me < ds.sizes["layer"] - 1:
            after = sel.sel(layer=slice(me + 1, None))
            out["after_me_layer"] = {
                "cos_prev_min": number(after.first_cos_prev.mean("prompt").min()),
                "cos_across_prompts_min": number(after.first_cos_across_prompts.min()),
                "ordinary_cos_prev_mean": number(after.other_cos_prev.mean()),
                "ordinary_cos_across_prompts_mean": number(after.other_cos_across_prompts.mean()),
            }
        return out

    base = one("baseline")
    summary = {
        "model": ds.attrs.get("mechme_model", ""),
        "me_layer": None if me < 0 else me,
        "n_prompts": int(ds.sizes["prompt"]),
        **base,
    }
    others = [str(n) for n in ds.condition.values if n != "baseline"]
    if others:
        summary["conditions"] = {name: one(name) for name in others}
    return summary


def measure_rigidity(
    model: LoadedModel | str,
    *,
    conditions=(),
    prompts: str = "sentences",
    text: str | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
    out: str | Path | None = "runs",
    progress: bool = True,
    verdict: dict | None = None,
) -> tuple[xr.Dataset, dict]:
    """Measure rigidity and attention-input diversity per layer, for a baseline and each condition.

    Args:
        model: a loaded model or a model reference for `load_model`.
        conditions: `mechme.specs.Condition` objects; each runs after the baseline.
        prompts: bundled prompt set, used when ``text`` is None.
        text: a .txt file (cut into rows of ``seq_len`` tokens) or a .jsonl file.
        seq_len: tokens per row; longer prompts are truncated.
        batch_size: rows per forward pass.
        max_tokens: stop after this many tokens in total (None: all of the text).
        out: folder for the run file and figures; None writes nothing.
        progress: show a progress bar on stderr.
        verdict: a scan verdict of this model and text (ME Layer and massive dims);
            scanned here when None.

    Returns:
        ``(dataset, summary)``. The Dataset has dims ``condition``, ``layer`` and
        ``prompt``. The summary has ``me_layer``, ``layers`` and ``diversity`` for the
        baseline, and with conditions a ``conditions`` dict mapping each name to the same.
    """
    if isinstance(model, str):
        model = load_model(model)
    conditions = check_conditions(conditions)
    if out is not None:
        out = runfile.check_writable(out)
    options = {"prompts": prompts, "text": text, "seq_len": seq_len, "max_tokens": max_tokens,
               "batch_size": batch_size}
    text_rows = prepare_text(model, **options)
    if verdict is None:
        verdict = find_me_layer(model, options)
    identity = {
        "measure": "rigidity", "model": model.ref, **options,
        "conditions": [to_dict(c) for c in conditions],
        "source": text_rows["source"], "text_sha256": text_rows["text_sha256"],
        "weights_sha256": model.weights_sha256, "n_prompts": len(text_rows["rows"]),
        "me_layer": verdict.get("me_layer"),
    }
    store = None
    if out is not None:
        store = out / f"rigidity-{runfile.spec_hash(identity)[:12]}.h5"
        if store.exists() and runfile.stored_hash(store) == runfile.spec_hash(identity):
            ds = runfile.open_run(store)
            return ds, _finish(ds, store)

    ctx, compiled = prepare_conditions(model, conditions, verdict, text_rows)
    results: dict[str, list[dict]] = {name: [] for name in compiled}
    batches = text_rows["batches"]
    bar = tqdm(total=len(batches) * len(compiled), desc=f"rigidity {model.ref}", unit="forward",
               disable=not progress, leave=False)
    for batch in batches:
        strings = [text_rows["strings"][i] for i in batch.prompt_ids]
        for condition in (BASELINE, *conditions):
            with weight_edits(condition, ctx):
                results[condition.name].append(trace_rigidity(ctx, compiled[condition.name], batch, strings))
            bar.update(1)
    bar.close()

    ds = assemble_rigidity(results, text_rows["rows"], model)
    ds.attrs["mechme_me_layer"] = -1 if ctx.me_layer is None else ctx.me_layer
    ds.attrs["mechme_verdict"] = json.dumps(verdict)
    if store is None:
        ds.attrs.update(runfile.provenance("rigidity", identity, model.describe()))
        return ds, _finish(ds, None)
    runfile.write_run(ds, store, kind="rigidity", spec=identity, model_info=model.describe())
    ds = runfile.open_run(store)
    return ds, _finish(ds, store)


def _finish(ds: xr.Dataset, store: Path | None) -> dict:
    summary = summarize_rigidity(ds)
    figures = []
    if store is not None:
        from mechme.plots.measures import plot_diversity, plot_rigidity

        figures = [plot_rigidity(ds, store.with_suffix(".png")),
                   plot_diversity(ds, store.with_name(store.stem + "-diversity.png"))]
    summary["store"] = str(store) if store else None
    summary["figures"] = [str(f) for f in figures]
    return summary
