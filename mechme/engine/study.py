"""Run a `Study`: a baseline and each condition, batch by batch, reduced on the device.

For every batch the baseline runs first. Its next-token log-probabilities stay on the
device for that batch only, and each condition's trace compares against them there.
Conditions without weight ops share one traced forward pass: the batch is repeated once
per condition and each condition edits only its own copy of the rows.
Per condition and prompt the trace returns: the KL divergence KL(baseline || condition)
of next-token distributions summed over real positions, the next-token loss, the number
of positions whose top-1 token matches the baseline, the massive statistics of the ME
Layer, and the largest |activation| of each massive dim at the ME Layer and every later
layer. Finished batches are checkpointed, so an interrupted study resumes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from mechme.engine.compile import (
    Context,
    _site_order,
    apply_edit,
    compile_condition,
    has_weight_ops,
    validate_condition,
    weight_edits,
)
from mechme.engine.scan import ScanSpec, resolve_rows, scan
from mechme.engine.sites import read_site
from mechme.engine.text import Batch, make_batches, pad_id
from mechme.errors import SpecError
from mechme.measures import massive
from mechme.models.loaded import LoadedModel
from mechme.models.loading import load_model
from mechme.specs.core import Condition, Mean, Replace, Study
from mechme.store import runfile

BASELINE = Condition(name="baseline")


@dataclass
class StudyResult:
    """A finished study: its Dataset (dims condition, prompt, layer, massive_dim) and summary."""

    dataset: xr.Dataset
    store: Path | None
    reused: bool = False

    @property
    def figure(self) -> Path | None:
        return self.store.with_suffix(".png") if self.store else None

    def summary(self) -> dict[str, dict]:
        ds = self.dataset
        out = {}
        for name in ds.condition.values:
            sel = ds.sel(condition=name)
            n = float(sel.n_positions.sum())
            me = ds.attrs.get("mechme_me_layer", -1)
            has_me = me is not None and int(me) >= 0
            out[str(name)] = {
                "massive_max": float(np.abs(sel.me_top).max()) if has_me else None,
                "emerges": bool(float(sel.me_emerges.mean()) >= 0.5) if has_me else None,
                "kl": float(sel.kl_sum.sum()) / n,
                "loss_delta": float(sel.nll_sum.sum() - ds.sel(condition="baseline").nll_sum.sum()) / n,
                "top1_agree": float(sel.agree_sum.sum()) / n,
            }
        return out


def _study_scan(study: Study, model: LoadedModel, out) -> dict:
    spec = ScanSpec(
        model=study.model, prompts=study.prompts, text=study.text, max_tokens=study.max_tokens,
        seq_len=study.seq_len, batch_size=study.batch_size, dtype=study.dtype,
        abs_threshold=study.abs_threshold, ratio_threshold=study.ratio_threshold,
    )
    return scan(spec, model=model, out=out, progress=False).verdict


def run_study(
    study: Study,
    *,
    model: LoadedModel | None = None,
    out: str | Path | None = "runs",
    progress: bool = True,
    resume: bool = True,
    remote: str | None = None,
    stack_tokens: int | None = None,
) -> StudyResult:
    """Run ``study`` and return its results (also written to ``out`` unless it is None).

    Args:
        remote: ``"local"`` runs every trace through nnsight's remote simulation, which
            serialises the trace as NDIF would; an ``ndif:`` model runs on NDIF itself.
        stack_tokens: conditions without weight ops share one traced forward pass, each
            on its own copy of the batch, up to this many tokens per pass; 1 runs one
            condition per pass. Results agree to float rounding either way. None picks
            `default_stack_tokens` for the model.
    """
    if stack_tokens is not None and (isinstance(stack_tokens, bool) or not isinstance(stack_tokens, int)
                                     or stack_tokens < 1):
        raise SpecError(f"stack_tokens must be a positive number of tokens or None, got {stack_tokens!r}")
    if out is not None:
        out = runfile.check_writable(out)
    if model is None:
        model = load_model(study.model, dtype=study.dtype, remote=remote)
    elif remote is not None:
        model = dataclasses.replace(model, remote=remote, _lm=model._lm)
    if stack_tokens is None:
        stack_tokens = default_stack_tokens(model)

    verdict = _study_scan(study, model, out)
    ctx = Context(model=model, me_layer=verdict["me_layer"], massive_dims=tuple(verdict["massive_dims"][:4]))
    for condition in study.conditions:
        validate_condition(condition, ctx)

    source, text_sha, rows = resolve_rows(ScanSpec(
        prompts=study.prompts, text=study.text, max_tokens=study.max_tokens, seq_len=study.seq_len,
    ), model.tokenizer)
    batches = make_batches(rows, batch_size=study.batch_size, pad=pad_id(model.tokenizer))
    strings = [model.tokenizer.convert_ids_to_tokens(r) for r in rows]

    identity = {**study.to_dict(), "text_sha256": text_sha, "weights_sha256": model.weights_sha256}
    digest = runfile.spec_hash(identity)[:12]
    store = partial_dir = None
    if out is not None:
        store = out / f"study-{study.name}-{digest}.h5"
        partial_dir = out / f".study-{study.name}-{digest}.partial"
        if resume and store.exists() and runfile.stored_hash(store) == runfile.spec_hash(identity):
            return StudyResult(runfile.open_run(store), store, reused=True)

    _calibrate(study, ctx, batches, strings)
    _prepare_replacements(study, ctx)
    compiled = {c.name: compile_condition(c, ctx) for c in (BASELINE, *study.conditions)}

    parts = []
    total = len(batches) * (1 + len(study.conditions))
    bar = tqdm(total=total, desc=f"study {study.name}", unit="forward", disable=not progress, leave=False)
    for batch in batches:
        name = f"batch-{batch.index:06d}"
        part = runfile.load_partial(partial_dir, name) if (partial_dir and resume) else None
        if part is None:
            row_strings = [strings[i] for i in batch.prompt_ids]
            part = _run_batch(study, ctx, compiled, batch, row_strings, bar, stack_tokens)
            if partial_dir is not None:
                runfile.save_partial(partial_dir, name, part)
        else:
            bar.update(1 + len(study.conditions))
        parts.append(part)
    bar.close()

    ds = _assemble(study, ctx, parts)
    ds.attrs["mechme_verdict"] = json.dumps(verdict)
    ds.attrs["mechme_me_layer"] = -1 if ctx.me_layer is None else ctx.me_layer
    if store is not None:
        runfile.write_run(ds, store, kind="study", spec=identity, model_info=model.describe())
        ds = runfile.open_run(store)
        shutil.rmtree(partial_dir, ignore_errors=True)
        result = StudyResult(ds, store)
        from mechme.plots.study import plot_study

        plot_study(result.summary(), f"{study.name} ({model.ref})", result.figure)
        return result
    return StudyResult(ds, store)


STACK_TOKENS = 4096


def default_stack_tokens(model: LoadedModel) -> int:
    """Return how many tokens one traced pass may stack for ``model``.

    A remote model stacks up to `STACK_TOKENS` tokens, because each trace is one request.
    So does a model on an accelerator, which a larger batch keeps busy. On a CPU each
    condition gets its own pass: on 2 cores, stacking 8 conditions of SmolLM2 took 1.13x
    the time of plain torch hooks against 1.04x for one pass each
    (benchmarks/bench_study.py). The stacked pass moves far larger tensors: its logits
    alone take 0.8 GB at 4,096 tokens.
    """
    if model.remote is not None or model.device.type != "cpu":
        return STACK_TOKENS
    return 1


def _groups(study: Study, batch: Batch, stack_tokens: int) -> list[list[str]]:
    """Split the baseline and conditions into groups that share one traced forward pass.

    Conditions without weight ops run on the same inputs, so their rows are stacked in
    one trace, up to ``stack_tokens`` tokens per trace. A condition that edits weights
    changes the model for every row, so it runs alone.
    """
    per_condition = batch.input_ids.numel()
    size = max(1, stack_tokens // max(1, per_condition))
    groups, current = [], ["baseline"]
    for condition in study.conditions:
        if has_weight_ops(condition):
            groups.append([condition.name])
            continue
        if len(current) == size:
            groups.append(current)
            current = []
        current.append(condition.name)
    if current:
        groups.append(current)
    # Keep the baseline's group first: the others compare against its log-probs.
    return sorted(groups, key=lambda g: "baseline" not in g)


def _run_batch(study, ctx, compiled, batch, strings, bar, stack_tokens: int = STACK_TOKENS) -> dict[str, np.ndarray]:
    conditions = {c.name: c for c in study.conditions}
    base_logprobs = None
    results = {}
    for group in _groups(study, batch, stack_tokens):
        condition = conditions.get(group[0], BASELINE) if len(group) == 1 else BASELINE
        with weight_edits(condition, ctx):
            stats, logprobs = trace_conditions(study, ctx, [compiled[n] for n in group], batch, strings,
                                               base_logprobs)
        if group[0] == "baseline":
            base_logprobs = logprobs
        results.update(zip(group, stats))
        bar.update(len(group))
    return {f"{name}/{key}": value for name, stats in results.items() for key, value in stats.items()}


def trace_condition(study, ctx, edits, batch: Batch, strings, base_logprobs):
    """Run one condition on one batch; return (per-prompt stats, log-probs on the device)."""
    stats, logprobs = trace_conditions(study, ctx, [edits], batch, strings, base_logprobs)
    return stats[0], logprobs


def _stack(batch: Batch, copies: int) -> Batch:
    if copies == 1:
        return batch
    return Batch(
        index=batch.index, prompt_ids=batch.prompt_ids * copies, n_pad=batch.n_pad * copies,
        input_ids=batch.input_ids.repeat(copies, 1), attention_mask=batch.attention_mask.repeat(copies, 1),
        position_ids=batch.position_ids.repeat(copies, 1),
    )


def trace_conditions(study, ctx, edit_lists, batch: Batch, strings, base_logprobs):
    """Run several conditions on one batch in one trace, each on its own copy of the rows.

    Condition ``j`` edits rows ``j * B .. (j + 1) * B`` of the stacked input. When
    ``base_logprobs`` is None the first condition is the reference that the others are
    compared against (the baseline). Returns (per-condition stats, the first condition's
    log-probs on the device).
    """
    import nnsight

    model = ctx.model
    me = ctx.me_layer
    n = len(batch.n_pad)
    stacked = _stack(batch, len(edit_lists))
    dims = torch.tensor(ctx.massive_dims, dtype=torch.long)
    real = stacked.attention_mask.bool()
    ids = batch.input_ids
    edit_at = {}
    for j, edits in enumerate(edit_lists):
        for edit in edits:
            edit_at.setdefault(edit.layer, []).append((j, edit))
    for layer in edit_at:
        edit_at[layer].sort(key=lambda item: _site_order(item[1].site))
    read_layers = [] if me is None else list(range(me, model.n_layers))
    last_layer = max([*edit_at, *read_layers], default=-1)

    with torch.no_grad(), model.lm.trace(stacked.model_inputs(), **model.trace_kwargs()):
        per_layer = []
        me_stats = None
        for layer in range(last_layer + 1):
            post = None
            reads = {}
            for j, edit in edit_at.get(layer, []):
                value = apply_edit(edit, ctx, batch, strings, row_offset=j * n, reads=reads)
                if edit.site == "resid_post":
                    post = value
            if layer in read_layers:
                if post is None:
                    post = read_site(model, layer, "resid_post")
                if layer == me:
                    me_stats = massive.reduce_layer(
                        post, real, stacked.n_pad, study.abs_threshold, study.ratio_threshold
                    )
                a = post.detach().float().abs() * real.unsqueeze(-1)
                per_layer.append(a[..., dims].amax(dim=1))  # [rows, massive_dim]
        logits = model.lm.output.logits.detach()
        first = torch.log_softmax(logits[:n].float(), dim=-1)
        base = first if base_logprobs is None else base_logprobs
        stats = []
        for j in range(len(edit_lists)):
            rows = slice(j * n, (j + 1) * n)
            logprobs = first if j == 0 else torch.log_softmax(logits[rows].float(), dim=-1)
            condition_stats = _compare(logprobs, None if (j == 0 and base_logprobs is None) else base, ids, real[rows])
            if me_stats is not None:
                condition_stats["me_top"] = me_stats["top_value"][rows, 0]
                condition_stats["me_massive_count"] = me_stats["massive_per_token"][rows].sum(-1)
            if per_layer:
                condition_stats["massive_by_layer"] = torch.stack([p[rows] for p in per_layer], dim=1)  # [batch, layer, dim]
            stats.append(condition_stats)
        saved = nnsight.save({"stats": stats, "logprobs": first})
    stats = [{k: v.cpu().numpy() for k, v in entry.items()} for entry in saved["stats"]]
    return stats, saved["logprobs"]


def _compare(logprobs, base_logprobs, ids, real) -> dict[str, torch.Tensor]:
    """Per-prompt sums over real next-token positions: KL, loss and top-1 agreement."""
    # A position counts when it and the next token are real (the last position has no target).
    valid = (real[:, :-1] & real[:, 1:]).float()
    lp = logprobs[:, :-1]
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if base_logprobs is None:
        base = lp
    else:
        base = base_logprobs[:, :-1]
    kl = (base.exp() * (base - lp)).sum(-1)
    agree = (lp.argmax(-1) == base.argmax(-1)).float()
    return {
        "kl_sum": (kl * valid).sum(-1),
        "nll_sum": (nll * valid).sum(-1),
        "agree_sum": (agree * valid).sum(-1),
        "n_positions": valid.sum(-1),
    }


def _calibrate(study: Study, ctx: Context, batches: list[Batch], strings) -> None:
    """Compute the mean of each (layer, site) that a Mean op needs, over all real tokens."""
    import nnsight

    from mechme.engine.sites import forward_order

    needed = forward_order([
        (layer, iv.site)
        for c in study.conditions for iv in c.interventions if isinstance(iv.op, Mean)
        for layer in iv.layers
    ])
    if not needed:
        return
    model = ctx.model
    sums = {key: 0.0 for key in needed}
    count = 0
    for batch in batches:
        real = batch.attention_mask.bool()
        with torch.no_grad(), model.lm.trace(batch.model_inputs(), **model.trace_kwargs()):
            totals = nnsight.save({
                key: read_site(model, *key)[real].detach().float().sum(0) for key in needed
            })
        for key in needed:
            sums[key] = sums[key] + totals[key]
        count += int(real.sum())
    ctx.calibration = {key: value / count for key, value in sums.items()}


def _prepare_replacements(study: Study, ctx: Context) -> None:
    """Record the clean state of each source prompt that a Replace op needs."""
    import nnsight

    from mechme.engine.sites import forward_order

    model = ctx.model
    requested: dict[str, set] = {}
    for c in study.conditions:
        for iv in c.interventions:
            if isinstance(iv.op, Replace):
                positions = (0,) if iv.tokens.kind == "first" else iv.tokens.positions
                for layer in iv.layers:
                    for p in positions:
                        if iv.op.capture is not None:
                            from mechme.engine.capture import load_patch

                            state = load_patch(iv.op.capture, model, site=iv.site, layer=layer, prompt=iv.op.prompt,
                                               position=p)
                            ctx.replacements[(iv.op.prompt, layer, iv.site, p)] = state
                        else:
                            requested.setdefault(iv.op.prompt, set()).add((layer, iv.site, p))
    for prompt, keys in requested.items():
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        length = ids.shape[1]
        for _, _, p in keys:
            if not -length <= p < length:
                raise SpecError(f"Replace source prompt {prompt!r} has {length} tokens; position {p} is out of range")
        order = forward_order([(layer, site) for layer, site, _ in keys])
        with torch.no_grad(), model.lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
            states = nnsight.save({key: read_site(model, *key)[0].detach().clone() for key in order})
        for layer, site, p in keys:
            ctx.replacements[(prompt, layer, site, p)] = states[(layer, site)][p]


def _assemble(study: Study, ctx: Context, parts: list[dict]) -> xr.Dataset:
    names = ["baseline", *(c.name for c in study.conditions)]

    def cat(key):
        return np.stack([np.concatenate([p[f"{n}/{key}"] for p in parts]) for n in names])

    data = {
        "kl_sum": (("condition", "prompt"), cat("kl_sum")),
        "nll_sum": (("condition", "prompt"), cat("nll_sum")),
        "agree_sum": (("condition", "prompt"), cat("agree_sum")),
        "n_positions": (("condition", "prompt"), cat("n_positions")),
    }
    coords = {"condition": names}
    if ctx.me_layer is not None:
        data["me_top"] = (("condition", "prompt"), cat("me_top").astype(np.float32))
        data["me_emerges"] = (("condition", "prompt"), cat("me_massive_count") > 0)
        data["massive_by_layer"] = (("condition", "prompt", "layer", "massive_dim"), cat("massive_by_layer"))
        coords["layer"] = np.arange(ctx.me_layer, ctx.model.n_layers)
        coords["massive_dim"] = np.array(ctx.massive_dims, dtype=np.int64)
    ds = xr.Dataset(data, coords={**coords, "prompt": np.arange(data["kl_sum"][1].shape[1])})
    ds["massive_by_layer" if "massive_by_layer" in ds else "kl_sum"].attrs["description"] = (
        "largest |activation| of each massive dim over real tokens, per layer from the ME Layer on"
    ) if "massive_by_layer" in ds else "KL(baseline || condition) summed over real next-token positions"
    return ds


def load_study_file(path: str | Path) -> Study:
    """Execute a Python file and return the one `Study` it defines at module level."""
    import runpy

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"study file {str(path)!r} not found")
    namespace = runpy.run_path(str(path), run_name="mechme_study")
    studies = [v for v in namespace.values() if isinstance(v, Study)]
    if len(studies) != 1:
        raise SpecError(
            f"{path} defines {len(studies)} Study objects at module level; define exactly one "
            "(e.g. study = Study(name=..., conditions=[...]))"
        )
    return studies[0]
