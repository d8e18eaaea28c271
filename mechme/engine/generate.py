"""Greedy generation under a condition, with each intervention applied at the steps its spec names.

An intervention with ``when="prefill"`` edits the prompt's forward pass only: under the KV
cache its edited keys and values are reused, and generated tokens are left alone. One
with ``when="every_step"`` also edits each generated token's forward pass. Such a pass
holds only the new token, so its token selector is read there: ``Tokens.first()``,
``Tokens.all()`` and ``Tokens.at(0)`` or ``Tokens.at(-1)`` pick the new token, which is
how the authors' released WeMask code treats position 0 under a cache. Weight ops hold
for the whole generation.

    from mechme.engine.generate import generate
    texts = generate(model, ["The capital of France is"], condition=cond, max_new_tokens=8)
"""

from __future__ import annotations

import torch

from mechme.engine.compile import Context, apply_edit, compile_condition, weight_edits
from mechme.engine.text import Batch, make_batches, pad_id
from mechme.errors import SpecError
from mechme.models.loaded import LoadedModel
from mechme.specs.core import Condition, Study


def generate(model: LoadedModel, prompts: list[str], *, condition: Condition | None = None,
             max_new_tokens: int = 20, batch_size: int = 8) -> list[str]:
    """Generate ``max_new_tokens`` greedily from each prompt under ``condition``.

    Returns the generated text of each prompt (without the prompt), cut at the end-of-
    sequence token. Selectors that need a scan (``Dims.massive()``) run one on the bundled
    sentences; ``Mean`` ops are calibrated on the prompts themselves.
    """
    from mechme.engine.study import _calibrate, _prepare_replacements

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SpecError("prompts must be a non-empty list of non-empty strings")
    condition = condition or Condition(name="unedited")
    for iv in condition.interventions:
        if iv.when == "every_step" and iv.tokens.kind == "delimiters":
            raise SpecError("Tokens.delimiters() cannot apply at every generation step: the new token is not "
                            "known when the edit is set up; use when='prefill' or another token selector")
    ctx = Context(model=model, **_scan_inputs(model, condition))
    edits = compile_condition(condition, ctx)
    tokenizer = model.tokenizer
    rows = [tokenizer(p).input_ids for p in prompts]
    batches = make_batches(rows, batch_size=batch_size, pad=pad_id(tokenizer))
    strings = [tokenizer.convert_ids_to_tokens(r) for r in rows]
    study = Study(name="generate", model=model.ref, conditions=(condition,))
    _calibrate(study, ctx, batches, strings)
    _prepare_replacements(study, ctx)

    texts: list[str] = [""] * len(prompts)
    with weight_edits(condition, ctx):
        for batch in batches:
            ids = _generate_batch(model, ctx, edits, batch, [strings[i] for i in batch.prompt_ids], max_new_tokens)
            for row, prompt_id in enumerate(batch.prompt_ids):
                new = ids[row, batch.input_ids.shape[1]:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                texts[prompt_id] = tokenizer.decode(new, skip_special_tokens=True)
    return texts


def _scan_inputs(model: LoadedModel, condition: Condition) -> dict:
    if not any(iv.dims.kind == "massive" for iv in condition.interventions):
        return {}
    from mechme.engine.scan import scan

    verdict = scan(model=model, prompts="sentences", out=None, progress=False).verdict
    return {"me_layer": verdict["me_layer"], "massive_dims": tuple(verdict["massive_dims"][:4])}


def _generate_batch(model, ctx, edits, batch: Batch, strings, max_new_tokens: int) -> torch.Tensor:
    import nnsight

    prefill = edits
    every = [e for e in edits if e.intervention.when == "every_step"]
    n = len(batch.n_pad)

    def step_batch(step: int) -> Batch:
        # A generated token's pass: one real token per row, no padding. The index seeds
        # Noise ops, so each step draws its own noise.
        return Batch(index=batch.index * 1_000_003 + step, prompt_ids=batch.prompt_ids,
                     input_ids=torch.zeros(n, 1, dtype=torch.long), attention_mask=torch.ones(n, 1, dtype=torch.long),
                     position_ids=torch.zeros(n, 1, dtype=torch.long), n_pad=[0] * n)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    pad = pad_id(model.tokenizer)
    # min_new_tokens fixes the number of passes, so the loop below ends with the run;
    # text after an end-of-sequence token is cut afterwards.
    with torch.no_grad(), model.lm.generate(inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=pad, **model.trace_kwargs()) as tracer:
        for step in tracer.iter[:max_new_tokens]:
            reads = {}
            if step == 0:
                for edit in prefill:
                    apply_edit(edit, ctx, batch, strings, reads=reads)
            else:
                for edit in every:
                    apply_edit(edit, ctx, step_batch(step), [[""]] * n, reads=reads)
        ids = nnsight.save(tracer.result)
    return ids

