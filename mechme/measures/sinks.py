"""Attention sinks: attention to the first token and the sink rate of Gu et al. (2024).

Gu et al., "When Attention Sink Emerges in Language Models" (arXiv 2410.10781), score
key position ``k`` of one prompt, layer and head by the mean attention it receives from
the queries that can see it: ``importance(k) = sum_{q >= k} A[q, k] / (T - k)``. A
(layer, head) pair is a sink when the importance of the first token exceeds
``epsilon`` (0.3 in their code), and the **sink rate** is 100 times the share of
(layer, head) pairs that are sinks, averaged over prompts. Their prompts have at least
64 tokens and are cut to 64 (``compute_attention_sink`` in ``eval_sink_open_source.py``
of github.com/sail-sg/Attention-Sink).

The attention probabilities need eager attention; `eager_attention` switches the model
for the duration of the measure and restores its implementation afterwards. Each
layer's ``[batch, head, query, key]`` weights are reduced inside the trace to
``[batch, head]`` importances of position 0 as soon as the layer has run, so memory
keeps at most one layer's attention.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from mechme.engine.compile import ActEdit, Context, weight_edits
from mechme.engine.study import BASELINE
from mechme.engine.text import Batch
from mechme.errors import SpecError
from mechme.measures.rigidity import (
    ATTENTION_WEIGHTS,
    check_conditions,
    edits_by_layer,
    find_me_layer,
    first_index,
    prepare_conditions,
    prepare_text,
    step_layer,
)
from mechme.models.loaded import LoadedModel
from mechme.models.loading import load_model
from mechme.specs.core import to_dict
from mechme.store import runfile

DEFAULT_EPSILON = 0.3


@contextlib.contextmanager
def eager_attention(model: LoadedModel):
    """Run the body with eager attention, then restore the model's own implementation.

    Raises:
        SpecError: the model cannot switch (a model hosted on NDIF, or one whose
            attention does not support switching at run time).
    """
    config = model.model.config
    original = getattr(config, "_attn_implementation", None)
    if original == "eager":
        yield
        return
    # The "local" remote backend simulates NDIF on this process's model, which can switch.
    if model.remote not in (None, "local"):
        raise SpecError(
            f"attention sinks need eager attention, but {model.ref} runs remotely with {original!r} attention, "
            "which cannot be switched from here; load the model with attn_implementation='eager'"
        )
    try:
        model.model.set_attn_implementation("eager")
    except (ValueError, ImportError) as err:
        raise SpecError(
            f"attention sinks need eager attention, and {model.ref} could not switch from {original!r}: {err}; "
            "load it with load_model(..., attn_implementation='eager')"
        ) from err
    # set_attn_implementation only logs a warning when a model cannot switch.
    if config._attn_implementation != "eager":
        raise SpecError(
            f"attention sinks need eager attention, and {model.ref} stayed on {config._attn_implementation!r}; "
            "load it with load_model(..., attn_implementation='eager')"
        )
    try:
        yield
    finally:
        model.model.set_attn_implementation(original)


def first_token_importance(weights: torch.Tensor, real: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Compute the Gu et al. importance of each row's first real token, per head.

    Args:
        weights: attention probabilities ``[batch, head, query, key]`` of one layer.
        real: ``[batch, position]`` mask of real (non-pad) tokens.
        first: padded index of each row's first real token.

    Returns:
        ``[batch, head]``: attention to position 0 summed over the real queries and
        divided by their number, ``T - 0``, as Gu et al. do. Queries that a sliding
        window keeps from seeing position 0 add 0 to the sum but still count in ``T``.
    """
    batch, heads, queries, _ = weights.shape
    index = first.view(batch, 1, 1, 1).expand(batch, heads, queries, 1)
    to_first = weights.detach().float().gather(3, index)[..., 0]  # [batch, head, query]
    queries_real = real.unsqueeze(1).float()
    return (to_first * queries_real).sum(-1) / queries_real.sum(-1)


def trace_sinks(ctx: Context, edits: list[ActEdit], batch: Batch, strings) -> np.ndarray:
    """Run one condition on one batch; return importances ``[layer, batch, head]``."""
    import nnsight

    model = ctx.model
    real = batch.attention_mask.bool()
    first = first_index(batch)
    edit_at = edits_by_layer(edits)
    with torch.no_grad(), model.lm.trace(batch.model_inputs(), **model.trace_kwargs()):
        per_layer = []
        for layer in range(model.n_layers):
            values = step_layer(ctx, layer, edit_at.get(layer, []), (ATTENTION_WEIGHTS,), batch, strings)
            per_layer.append(first_token_importance(values[ATTENTION_WEIGHTS], real, first))
            # Drop the layer's [batch, head, query, key] weights before the next layer runs.
            del values
        saved = nnsight.save(torch.stack(per_layer))
    return saved.cpu().numpy()


def assemble_sinks(results: dict[str, list[np.ndarray]], rows: list[list[int]], model: LoadedModel,
                   epsilon: float) -> xr.Dataset:
    """Build the Dataset (dims condition, prompt, layer, head) from per-batch importances."""
    names = list(results)
    importance = np.stack([np.concatenate(results[n], axis=1) for n in names])  # [cond, layer, prompt, head]
    importance = importance.transpose(0, 2, 1, 3).astype(np.float32)
    sink = importance > epsilon
    ds = xr.Dataset(
        {
            "importance": (("condition", "prompt", "layer", "head"), importance),
            "sink_rate": (("condition",), 100.0 * sink.mean(axis=(1, 2, 3))),
            "sink_rate_by_layer": (("condition", "layer"), 100.0 * sink.mean(axis=(1, 3))),
            "mean_attention_to_first": (("condition", "layer", "head"), importance.mean(axis=1)),
            "prompt_length": (("prompt",), np.array([len(r) for r in rows], dtype=np.int32)),
        },
        coords={
            "condition": names,
            "prompt": np.arange(len(rows)),
            "layer": np.arange(model.n_layers),
            "head": np.arange(importance.shape[-1]),
        },
    )
    ds["importance"].attrs["description"] = (
        "Gu et al. importance of position 0: attention to it averaged over the prompt's real queries"
    )
    ds["sink_rate"].attrs["description"] = f"100 x share of (layer, head) pairs with importance > {epsilon}, mean over prompts"
    ds["sink_rate_by_layer"].attrs["description"] = f"100 x share of heads with importance > {epsilon}, mean over prompts"
    ds["mean_attention_to_first"].attrs["description"] = "importance of position 0, mean over prompts"
    ds.attrs["mechme_epsilon"] = epsilon
    return ds


def summarize_sinks(ds: xr.Dataset) -> dict:
    """Return the sink rate and per-layer attention to the first token of each condition."""
    me = int(ds.attrs.get("mechme_me_layer", -1))

    def one(name: str) -> dict:
        sel = ds.sel(condition=name)
        out = {
            "sink_rate": float(sel.sink_rate),
            "layers": [
                {
                    "layer": int(layer),
                    "mean_attention_to_first": float(sel.mean_attention_to_first.sel(layer=layer).mean()),
                    "sink_rate": float(sel.sink_rate_by_layer.sel(layer=layer)),
                }
                for layer in ds.layer.values
            ],
        }
        if me >= 0:
            # Sink rate over the layers up to and including the ME Layer, and after it.
            by_layer = sel.sink_rate_by_layer.values
            out["sink_rate_through_me_layer"] = float(by_layer[: me + 1].mean())
            out["sink_rate_after_me_layer"] = float(by_layer[me + 1:].mean()) if me + 1 < len(by_layer) else None
        return out

    summary = {
        "model": ds.attrs.get("mechme_model", ""),
        "me_layer": None if me < 0 else me,
        "epsilon": float(ds.attrs["mechme_epsilon"]),
        "seq_len": int(ds.attrs["mechme_seq_len"]),
        "n_prompts": int(ds.sizes["prompt"]),
        **one("baseline"),
    }
    others = [str(n) for n in ds.condition.values if n != "baseline"]
    if others:
        summary["conditions"] = {name: one(name) for name in others}
    return summary


def measure_sinks(
    model: LoadedModel | str,
    *,
    conditions=(),
    epsilon: float = DEFAULT_EPSILON,
    prompts: str = "sentences",
    text: str | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
    out: str | Path | None = "runs",
    progress: bool = True,
    verdict: dict | None = None,
) -> tuple[xr.Dataset, dict]:
    """Measure attention to the first token and the sink rate, for a baseline and each condition.

    Args:
        model: a loaded model or a model reference for `load_model`.
        conditions: `mechme.specs.Condition` objects; each runs after the baseline.
        epsilon: a head is a sink when its importance of position 0 exceeds this.
        prompts: bundled prompt set, used when ``text`` is None.
        text: a .txt file (cut into rows of ``seq_len`` tokens) or a .jsonl file.
        seq_len: tokens per row; longer prompts are truncated (Gu et al. use 64).
        batch_size: rows per forward pass.
        max_tokens: stop after this many tokens in total (None: all of the text).
        out: folder for the run file and figure; None writes nothing.
        progress: show a progress bar on stderr.
        verdict: a scan verdict of this model and text; scanned here when None.

    Returns:
        ``(dataset, summary)``: the Dataset has dims ``condition``, ``prompt``, ``layer``
        and ``head``; the summary has ``sink_rate``, ``epsilon``, ``seq_len``,
        ``n_prompts``, ``layers`` and, with conditions, ``conditions``.
    """
    if not 0 < epsilon < 1:
        raise SpecError(f"epsilon must be between 0 and 1, got {epsilon!r}; Gu et al. use 0.3")
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
        "measure": "sinks", "model": model.ref, **options, "epsilon": epsilon,
        "conditions": [to_dict(c) for c in conditions],
        "source": text_rows["source"], "text_sha256": text_rows["text_sha256"],
        "weights_sha256": model.weights_sha256, "n_prompts": len(text_rows["rows"]),
        "me_layer": verdict.get("me_layer"),
    }
    store = None
    if out is not None:
        store = out / f"sinks-{runfile.spec_hash(identity)[:12]}.h5"
        if store.exists() and runfile.stored_hash(store) == runfile.spec_hash(identity):
            ds = runfile.open_run(store)
            return ds, _finish(ds, store)

    ctx, compiled = prepare_conditions(model, conditions, verdict, text_rows)
    results: dict[str, list[np.ndarray]] = {name: [] for name in compiled}
    batches = text_rows["batches"]
    bar = tqdm(total=len(batches) * len(compiled), desc=f"sinks {model.ref}", unit="forward",
               disable=not progress, leave=False)
    with eager_attention(model):
        for batch in batches:
            strings = [text_rows["strings"][i] for i in batch.prompt_ids]
            for condition in (BASELINE, *conditions):
                with weight_edits(condition, ctx):
                    results[condition.name].append(trace_sinks(ctx, compiled[condition.name], batch, strings))
                bar.update(1)
    bar.close()

    ds = assemble_sinks(results, text_rows["rows"], model, epsilon)
    ds.attrs["mechme_me_layer"] = -1 if ctx.me_layer is None else ctx.me_layer
    ds.attrs["mechme_verdict"] = json.dumps(verdict)
    ds.attrs["mechme_seq_len"] = seq_len
    if store is None:
        ds.attrs.update(runfile.provenance("sinks", identity, model.describe()))
        return ds, _finish(ds, None)
    runfile.write_run(ds, store, kind="sinks", spec=identity, model_info=model.describe())
    ds = runfile.open_run(store)
    return ds, _finish(ds, store)


def _finish(ds: xr.Dataset, store: Path | None) -> dict:
    summary = summarize_sinks(ds)
    figure = None
    if store is not None:
        from mechme.plots.measures import plot_sinks

        figure = plot_sinks(ds, store.with_suffix(".png"))
    summary["store"] = str(store) if store else None
    summary["figure"] = str(figure) if figure else None
    return summary
