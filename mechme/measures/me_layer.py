"""Locate the Massive Emergence Layer (ME Layer) from scan statistics.

The rule: the ME Layer is the first layer whose output (``resid_post``) contains at least
one massive entry in at least ``majority`` of the prompts (default 0.5, so at least half
of them). A model where no layer
reaches that share gets ``me_layer = None``, never a forced layer.

The verdict carries its evidence: the jump of the mean top-1 magnitude from the layer
before (the embeddings for layer 0), the share of prompts that agree, the massive dims
and the tokens that hold them, and the branch that wrote the value.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import xarray as xr


def locate_me_layer(ds: xr.Dataset, *, majority: float = 0.5) -> dict:
    """Return the ME-Layer verdict for a scan dataset (see the module docstring)."""
    share = ds.massive_share.values
    top1 = np.abs(ds.top_value.isel(rank=0).values).mean(axis=1)  # mean over prompts, per layer
    candidates = np.flatnonzero(share >= majority)
    if candidates.size == 0:
        ratio = ds.ratio.values
        layer, prompt = np.unravel_index(np.argmax(ratio), ratio.shape)
        return {
            "me_layer": None,
            "share": float(share.max()),
            "jump": None,
            "top1": float(top1.max()),
            "massive_dims": [],
            "dim_counts": {},
            "massive_tokens": [],
            "branch": None,
            "decomposition": None,
            "persists_share": None,
            "text": (
                f"no massive activations: no layer has an entry above the criterion in at least "
                f"{majority:.0%} of prompts (highest share {share.max():.0%}; largest top-1/median ratio "
                f"{ratio.max():.0f} at layer {int(layer)})"
            ),
        }

    me = int(candidates[0])
    before = float(np.abs(ds.input_top.values).mean()) if me == 0 else float(top1[me - 1])
    jump = float(top1[me] / before) if before > 0 else float("inf")

    per_dim = ds.massive_per_dim.sel(layer=me).values
    dims = [int(d) for d in np.argsort(-per_dim) if per_dim[d] > 0]
    tokens = _massive_tokens(ds, me)

    # Decomposition of the top entry of each prompt that contains a massive entry.
    holders = ds.massive_count.sel(layer=me).values > 0
    value = ds.top_value.sel(layer=me).isel(rank=0).values[holders]
    sign = np.sign(value)
    parts = {
        name: float(np.median(ds[name].sel(layer=me).values[holders] * sign))
        for name in ("resid_in", "attn", "mlp")
    }
    parts["value"] = float(np.median(np.abs(value)))
    branch = "mlp" if parts["mlp"] >= parts["attn"] else "attention"
    later = share[me + 1:]
    persists = float((later >= majority).mean()) if later.size else None

    top_tokens = "; ".join(
        f"position {t['position']} ({t['prompts']} prompts: {', '.join(map(repr, t['tokens'][:3]))})" for t in tokens[:2]
    )
    text = (
        f"ME Layer {me}: massive activations first appear in {share[me]:.0%} of prompts "
        f"(median prompt's top-1 {parts['value']:.4g}, {jump:.0f}x "
        f"{'the layer input' if me == 0 else 'the layer before'}), in dim "
        f"{', '.join(map(str, dims[:3]))} at {top_tokens}; written by the {branch} branch "
        f"(residual in {parts['resid_in']:.4g}, attention {parts['attn']:.4g}, MLP {parts['mlp']:.4g})"
    )
    if persists is not None:
        text += f"; massive in {persists:.0%} of later layers"
    return {
        "me_layer": me,
        "share": float(share[me]),
        "jump": jump,
        "top1": parts["value"],
        "massive_dims": dims,
        "dim_counts": {str(d): int(per_dim[d]) for d in dims},
        "massive_tokens": tokens,
        "branch": branch,
        "decomposition": parts,
        "persists_share": persists,
        "text": text,
    }


def _massive_tokens(ds: xr.Dataset, layer: int, limit: int = 10) -> list[dict]:
    """Group the tokens that hold massive entries at ``layer`` by position.

    Returns one dict per position, most frequent first: the position, the number of
    prompts with a massive entry there, and the most common token strings there.
    """
    counts = ds.massive_per_token.sel(layer=layer).values  # [prompt, position]
    tokens = ds.token.values
    by_position: dict[int, Counter] = {}
    for prompt, position in zip(*np.nonzero(counts)):
        by_position.setdefault(int(position), Counter())[str(tokens[prompt, position])] += 1
    ranked = sorted(by_position.items(), key=lambda item: -sum(item[1].values()))
    return [
        {"position": position, "prompts": sum(tally.values()), "tokens": [t for t, _ in tally.most_common(5)]}
        for position, tally in ranked[:limit]
    ]
