"""Diversity: the massive token lowers the diversity of what attention reads."""

from pathlib import Path

import numpy as np

from mechme.findings import Finding, markdown_table
from mechme.measures.rigidity import measure_rigidity
from mechme.models import load_model


def analysis(out: Path, remote: str | None = None) -> Finding:
    rows, stores, figures, deltas = [], [], [], {}
    for ref in ("smollm2-135m", "gemma3-270m"):
        ds, summary = measure_rigidity(load_model(ref, remote=remote), out=out, progress=False)
        if summary.get("store"):
            stores.append(Path(summary["store"]))
        figures += [Path(f) for f in summary.get("figures", []) if "diversity" in Path(f).name]
        me = summary["me_layer"]
        after = [d for d in summary["diversity"] if d["layer"] > me]
        before = [d for d in summary["diversity"] if d["layer"] <= me]

        def mean(items, key):
            return float(np.mean([d[key] for d in items])) if items else float("nan")

        row = [ref, me]
        for items in (before, after):
            row += [f"{mean(items, 'mean_cos'):.3f}", f"{mean(items, 'mean_cos_without_massive'):.3f}",
                    f"{mean(items, 'erank'):.2f}", f"{mean(items, 'erank_without_massive'):.2f}"]
        rows.append(row)
        deltas[ref] = (mean(after, "mean_cos") - mean(after, "mean_cos_without_massive"),
                       mean(after, "erank_without_massive") - mean(after, "erank"))
    table = markdown_table(
        ["model", "ME Layer",
         "up to ME: mean cos", "up to ME: mean cos without massive", "up to ME: eRank", "up to ME: eRank without",
         "after ME: mean cos", "after ME: mean cos without massive", "after ME: eRank", "after ME: eRank without"],
        rows)
    lowers = [ref for ref, (dcos, derank) in deltas.items() if dcos > 0 or derank > 0]
    verdict = "holds" if len(lowers) == 2 else ("partly holds" if lowers else "does not hold")
    measured = "; ".join(
        f"{ref}: after the ME Layer the massive token raises the mean pairwise cosine of the attention input by "
        f"{dcos:+.3f} and changes its effective rank by {-derank:+.2f}" for ref, (dcos, derank) in deltas.items()
    ) + "."
    reason = ("Removing the massive token from the attention input makes it more diverse in both models."
              if verdict == "holds" else
              "The massive token's share of the attention input's similarity and rank, measured by dropping it, "
              "is shown per model; the claim holds only where dropping it makes the input more diverse.")
    return Finding(title="The massive token lowers attention-input diversity", verdict=verdict, table=table,
                   claim="The massive token's invariance lowers the diversity of the hidden representations "
                         "that reach attention.",
                   measured=measured, reason=reason, stores=stores, figures=figures)
