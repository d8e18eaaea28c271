"""Measures computed offline from a capture file, with no model loaded.

`rigidity_from_capture` reads the residual stream at each prompt's first token from a
file written by `mechme.engine.capture.capture` and returns, per layer:

- ``cos_prev``: cosine similarity between the state at layer L and at layer L - 1 of
  the same prompt, averaged over prompts (NaN where layer L - 1 was not captured);
- ``pairwise_cos``: cosine similarity between the states of two different prompts at
  layer L, averaged over all pairs of prompts;
- ``mean_norm``: L2 norm of the state, averaged over prompts.

A rigid massive-token state shows as ``cos_prev`` near 1 over many layers, a
``pairwise_cos`` near 1 (every prompt has the same state) and a large norm. The file
is read one layer at a time, so memory keeps one ``[prompt, dim]`` slice per layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from mechme.errors import SpecError


def rigidity_from_capture(path: str | Path, *, site: str = "resid_post") -> xr.Dataset:
    """Compute per-layer rigidity numbers from the first-token states in a capture.

    Args:
        path: a finished capture. It must contain position 0 of every prompt: a capture
            with ``tokens="first"``, ``"all"`` or positions that include 0.
        site: the captured site to read (default ``resid_post``).

    Returns:
        A Dataset over ``layer`` with ``cos_prev``, ``pairwise_cos`` and ``mean_norm``,
        and over (``prompt``, ``layer``) with ``cos_prev_per_prompt`` and ``norm_per_prompt``.

    Raises:
        SpecError: the site is not captured, position 0 is missing, or there are fewer
            than two prompts.
        StoreError: the file is unfinished, corrupt or truncated.
    """
    from mechme.engine.capture import open_capture

    with open_capture(path) as ds:
        if site not in ds.data_vars:
            raise SpecError(f"site {site!r} is not in capture {path}; it contains {', '.join(map(str, ds.data_vars))}")
        states = _first_token_states(ds[site], path)
        layers = [int(v) for v in ds.layer.values]
        n_prompts = states.sizes["row"]
        if n_prompts < 2:
            raise SpecError(f"capture {path} has {n_prompts} prompt; pairwise cosine needs at least two")

        cos_prev = np.full((n_prompts, len(layers)), np.nan)
        norms = np.empty((n_prompts, len(layers)))
        pairwise = np.empty(len(layers))
        previous_layer, previous = None, None
        for i, layer in enumerate(layers):
            # float64, because a massive entry (1e4 or more) next to entries near 1 loses
            # digits of the cosine in float32.
            h = states.sel(layer=layer).values.astype(np.float64)
            norm = np.linalg.norm(h, axis=1)
            norms[:, i] = norm
            unit = h / np.maximum(norm, np.finfo(np.float64).tiny)[:, None]
            pairwise[i] = _mean_pairwise_cosine(unit)
            if previous_layer == layer - 1:
                cos_prev[:, i] = np.sum(unit * previous, axis=1)
            previous_layer, previous = layer, unit
        prompts = states["prompt"].values

    return xr.Dataset(
        {
            "cos_prev": (("layer",), cos_prev.mean(axis=0)),
            "pairwise_cos": (("layer",), pairwise),
            "mean_norm": (("layer",), norms.mean(axis=0)),
            "cos_prev_per_prompt": (("prompt", "layer"), cos_prev),
            "norm_per_prompt": (("prompt", "layer"), norms),
        },
        coords={"layer": layers, "prompt": prompts},
        attrs={"site": site, "source": str(path)},
    )


def _first_token_states(values: xr.DataArray, path) -> xr.DataArray:
    """Return ``values`` at position 0 of each prompt, with the row axis named ``row``."""
    axis = values.dims[0]
    if axis == "prompt":
        states = values.rename(prompt="row")
        return states.assign_coords(prompt=("row", states["row"].values))
    # Flat token axis: keep one row per prompt, the one at position 0.
    rows = np.flatnonzero(values["position"].values == 0)
    if rows.size == 0:
        raise SpecError(
            f"capture {path} contains no token at position 0; rigidity needs the first token, "
            "so capture with --tokens first (or all)"
        )
    return values.isel({axis: rows}).rename({axis: "row"})


def _mean_pairwise_cosine(unit: np.ndarray) -> float:
    """Mean of ``unit[i] . unit[j]`` over pairs i < j, in O(prompts x dims).

    The sum over ordered pairs i != j is ``|sum_i u_i|^2 - sum_i |u_i|^2``.
    """
    n = unit.shape[0]
    total = unit.sum(axis=0)
    off_diagonal = total @ total - np.sum(unit * unit)
    return float(off_diagonal / (n * (n - 1)))
