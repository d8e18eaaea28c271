"""Figure of a scan: top-1, top-2, top-3 and median magnitude per layer, log scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def plot_scan(ds: xr.Dataset, verdict: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = ds.layer.values
    tops = np.abs(ds.top_value.values).mean(axis=1)  # [layer, rank], mean over prompts
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    for rank, style in zip(range(tops.shape[1]), ("-o", "-s", "-^")):
        ax.plot(layers, tops[:, rank], style, ms=3.5, lw=1.4, label=f"top-{rank + 1}")
    ax.plot(layers, ds.layer_median.values, "-", color="0.4", lw=1.4, label="median")
    me = verdict.get("me_layer")
    if me is not None:
        ax.axvline(me, color="crimson", ls="--", lw=1.2, label=f"ME Layer {me}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of decoder layer, 0-based)")
    ax.set_ylabel("|activation| (mean over prompts)")
    ax.set_title(f"{ds.attrs.get('mechme_model', '')}: massive activations per layer", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
