"""Figure of a study: massive magnitude and KL divergence per condition."""

from __future__ import annotations

from pathlib import Path


def plot_study(summary: dict[str, dict], title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.6), dpi=120, sharey=True)
    massive = [summary[n]["massive_max"] or 0.0 for n in names]
    colors = ["#4a7" if summary[n]["emerges"] else "#c44" for n in names]
    left.barh(names, massive, color=colors)
    left.set_xscale("log")
    left.set_xlabel("massive max |a| at the ME Layer (green: still massive)")
    left.invert_yaxis()
    right.barh(names, [summary[n]["kl"] for n in names], color="#57a")
    right.set_xlabel("KL(baseline || condition), nats per token")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
