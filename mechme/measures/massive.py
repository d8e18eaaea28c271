"""Massive-activation statistics, reduced on the device one layer at a time.

A *massive activation* is an entry ``a`` of a hidden state with ``|a| > abs_threshold``
(default 100) and ``|a| > ratio_threshold * median|h|`` (default 1000), where the median
is taken over every real (non-pad) entry of the same prompt's hidden state at that
layer. This is the criterion of Sun et al. 2024, "Massive Activations in Large Language
Models" (arXiv 2402.17762).

`reduce_layer` uses only torch operations, so it can run inside an nnsight trace,
including a remote one, and only small summaries leave the device.

The layer-wide median (all prompts pooled) comes from a histogram sketch: |a| is binned
on a log10 grid of ``BINS_PER_DECADE`` bins per decade over ``[1e-8, 1e6]``, and the
median is read as the geometric centre of the bin that holds it, so its relative error
is at most ``10**(1 / (2 * BINS_PER_DECADE)) - 1`` (1.2% at 100 bins per decade). Values
below 1e-8 fall in the first bin and values above 1e6 in the last.
"""

from __future__ import annotations

import numpy as np
import torch

TOP_RANKS = 3
BINS_PER_DECADE = 100
LOG10_MIN = -8.0
LOG10_MAX = 6.0
N_BINS = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)


def reduce_layer(
    h: torch.Tensor,
    real: torch.Tensor,
    n_pad: list[int],
    abs_threshold: float,
    ratio_threshold: float,
) -> dict[str, torch.Tensor]:
    """Summarise one layer's hidden state for a batch.

    Args:
        h: hidden state ``[batch, seq, dim]``.
        real: ``[batch, seq]`` bool, True at real (non-pad) tokens.
        n_pad: left pad count of each row.
        abs_threshold, ratio_threshold: the massive criterion.

    Returns:
        A dict of small tensors (indices are into the padded ``seq`` axis):
        ``top_value``/``top_flat`` ``[batch, 3]`` (signed value, flat index seq*dim+dim),
        ``median`` ``[batch]``, ``massive_per_token`` ``[batch, seq]``,
        ``massive_per_dim`` ``[dim]``, ``hist`` ``[N_BINS]``.
    """
    h = h.detach().float()
    batch, seq, dim = h.shape
    a = h.abs() * real.unsqueeze(-1)

    # Per-prompt top entries, located by flat index over (seq, dim).
    flat = a.reshape(batch, seq * dim)
    top_abs, top_flat = flat.topk(TOP_RANKS, dim=1)
    top_value = h.reshape(batch, seq * dim).gather(1, top_flat)

    # Per-prompt median over real entries only (the lower median for an even count). Rows
    # with the same padding share one batched median call: one call for unpadded text rows.
    medians = torch.empty(batch, dtype=a.dtype, device=a.device)
    for pad in sorted(set(n_pad)):
        rows = torch.tensor([b for b in range(batch) if n_pad[b] == pad], device=a.device)
        medians[rows] = a[rows, pad:].reshape(len(rows), -1).median(dim=1).values

    # Entries meeting the criterion, counted per token and per dim.
    limit = torch.clamp(medians * ratio_threshold, min=abs_threshold).view(batch, 1, 1)
    massive = a > limit
    massive_per_token = massive.sum(-1).to(torch.int32)
    massive_per_dim = massive.sum((0, 1)).to(torch.int64)

    # Log-spaced histogram of real entries for the pooled median.
    values = a[real]
    logs = torch.log10(values.clamp(min=10.0**LOG10_MIN))
    hist = torch.histc(logs, bins=N_BINS, min=LOG10_MIN, max=LOG10_MAX).to(torch.int64)
    return {
        "top_value": top_value,
        "top_flat": top_flat,
        "median": medians,
        "massive_per_token": massive_per_token,
        "massive_per_dim": massive_per_dim,
        "hist": hist,
    }


def bin_lower_edges() -> np.ndarray:
    return 10.0 ** (LOG10_MIN + np.arange(N_BINS) / BINS_PER_DECADE)


def histogram_median(hist: np.ndarray) -> float:
    """Return the median |a| from a log-spaced histogram (see the module docstring)."""
    total = hist.sum()
    if total == 0:
        return float("nan")
    index = int(np.searchsorted(np.cumsum(hist), (total + 1) / 2))
    return float(10.0 ** (LOG10_MIN + (index + 0.5) / BINS_PER_DECADE))
