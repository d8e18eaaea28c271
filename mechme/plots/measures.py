"""Figures of the rigidity, diversity and attention-sink measures, one PNG per figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_me_layer(ax, ds: xr.Dataset) -> None:
    me = int(ds.attrs.get("mechme_me_layer", -1))
    if me >= 0:
        ax.axvline(me, color="crimson", ls="--", lw=1.0, label=f"ME Layer {me}")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_rigidity(ds: xr.Dataset, path: str | Path) -> Path:
    """Plot cosines and norms per layer for the first token and for ordinary tokens.

    One line per condition and token kind; solid lines are the first token (position 0),
    dotted lines the mean over ordinary tokens (positions >= 1).
    """
    plt = _pyplot()
    layers = ds.layer.values
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8), dpi=110)
    panels = (
        ("cos_prev", "cosine with the previous layer", "first_cos_prev", "other_cos_prev"),
        ("cos_across_prompts", "mean cosine across prompts", "first_cos_across_prompts", "other_cos_across_prompts"),
        ("norm", "L2 norm of resid_post", "first_norm", "other_norm"),
    )
    for ax, (_, label, first, other) in zip(axes, panels):
        for i, name in enumerate(ds.condition.values):
            sel = ds.sel(condition=name)
            color = f"C{i}"
            first_values = sel[first].mean("prompt") if "prompt" in sel[first].dims else sel[first]
            other_values = sel[other].mean("prompt") if "prompt" in sel[other].dims else sel[other]
            ax.plot(layers, first_values, "-o", ms=3, color=color, label=f"{name}: position 0")
            ax.plot(layers, other_values, ":", color=color, label=f"{name}: positions >= 1")
        _mark_me_layer(ax, ds)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{ds.attrs.get('mechme_model', '')}: rigidity of the first token's residual state", fontsize=10)
    return _save(fig, path)


def plot_diversity(ds: xr.Dataset, path: str | Path) -> Path:
    """Plot the attention input's mean pairwise cosine and effective rank per layer.

    Solid lines include position 0 (the massive token), dashed lines leave it out.
    """
    plt = _pyplot()
    layers = ds.layer.values
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=110)
    for ax, (with_first, without_first, label) in zip(axes, (
        ("mean_cos", "mean_cos_without_first", "mean pairwise cosine of attn_in"),
        ("erank", "erank_without_first", "effective rank of attn_in"),
    )):
        for i, name in enumerate(ds.condition.values):
            sel = ds.sel(condition=name)
            color = f"C{i}"
            ax.plot(layers, sel[with_first].mean("prompt"), "-o", ms=3, color=color, label=f"{name}: all tokens")
            ax.plot(layers, sel[without_first].mean("prompt"), "--", color=color, label=f"{name}: without position 0")
        _mark_me_layer(ax, ds)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{ds.attrs.get('mechme_model', '')}: diversity of the attention input", fontsize=10)
    return _save(fig, path)


def plot_sinks(ds: xr.Dataset, path: str | Path) -> Path:
    """Draw a layer x head heatmap of mean attention to the first token, one panel per condition."""
    plt = _pyplot()
    names = list(ds.condition.values)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 + 2.6 * len(names), 5.0), dpi=110, squeeze=False,
                             layout="constrained")
    image = None
    for ax, name in zip(axes[0], names):
        sel = ds.sel(condition=name)
        values = np.asarray(sel.mean_attention_to_first.values)  # [layer, head]
        image = ax.imshow(values, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"{name}: sink rate {float(sel.sink_rate):.1f}%", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        me = int(ds.attrs.get("mechme_me_layer", -1))
        if me >= 0:
            ax.axhline(me + 0.5, color="crimson", ls="--", lw=1.0)
    fig.colorbar(image, ax=axes[0].tolist(), label="mean attention to position 0")
    fig.suptitle(
        f"{ds.attrs.get('mechme_model', '')}: attention to the first token "
        f"(epsilon {float(ds.attrs.get('mechme_epsilon', 0.3)):g}; dashed line above the ME Layer)",
        fontsize=9,
    )
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_mitigation(results: dict[str, dict], path: str | Path) -> Path:
    """Draw a bar chart of task scores per variant with 95% bootstrap intervals.

    ``results`` maps a task to ``{"metric": name, variant: {"score", "ci95"}, ...}``;
    rows whose metric is not a 0-1 rate (perplexity, log-likelihoods) are left out.
    """
    plt = _pyplot()
    variants = ("baseline", "wemask", "finetuned", "finetuned+wemask")
    labels = ("baseline", "WeMask, no training", "fine-tuned", "fine-tuned with WeMask")
    tasks = [t for t, r in results.items() if r["metric"] != "perplexity" and "loglik" not in r["metric"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks)), 3.6))
    width = 0.8 / len(variants)
    x = np.arange(len(tasks))
    for i, (variant, label) in enumerate(zip(variants, labels)):
        scores = np.array([results[t][variant]["score"] for t in tasks])
        low = np.array([results[t][variant]["ci95"][0] for t in tasks])
        high = np.array([results[t][variant]["ci95"][1] for t in tasks])
        ax.bar(x + (i - 1.5) * width, scores, width, label=label,
               yerr=np.vstack([scores - low, high - scores]), capsize=2)
    ax.set_xticks(x, [f"{t}\n({results[t]['metric']})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (95% bootstrap interval)")
    ax.legend(fontsize=7, ncols=2)
    return _save(fig, path)
