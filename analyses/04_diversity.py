"""Diversity: the massive token lowers the diversity of what attention reads.

Two readings of the claim are measured on the attention input (``attn_in``) of the layers
after the ME Layer: with and without the massive token in the set of tokens compared,
and causally, the other tokens' diversity when the massive activation is removed at the
ME Layer (its MLP write at the first token zeroed).
"""

from pathlib import Path

import numpy as np

from mechme.findings import Finding, markdown_table, verdict_for
from mechme.measures.rigidity import measure_rigidity
from mechme.models import load_model
from mechme.scanning import me_layer_of
from mechme.specs import Condition, Intervention, Tokens, Zero


def _mean_after(diversity: list[dict], me: int, key: str) -> float:
    return float(np.mean([d[key] for d in diversity if d["layer"] > me]))


def analysis(out: Path, remote: str | None = None) -> Finding:
    rows, stores, figures, effects = [], [], [], {}
    for ref in ("smollm2-135m", "gemma3-270m"):
        model = load_model(ref, remote=remote)
        me = me_layer_of(model)
        remove = Condition(name="remove-massive", interventions=(
            Intervention(site="mlp_out", layers=(me,), op=Zero(), tokens=Tokens.first()),))
        ds, summary = measure_rigidity(model, conditions=[remove], out=out, progress=False)
        if summary.get("store"):
            stores.append(Path(summary["store"]))
        figures += [Path(f) for f in summary.get("figures", []) if "diversity" in Path(f).name]
        base, removed = summary["diversity"], summary["conditions"]["remove-massive"]["diversity"]
        e = effects[ref] = {
            "cos_with": _mean_after(base, me, "mean_cos"),
            "cos_without": _mean_after(base, me, "mean_cos_without_massive"),
            "erank_with": _mean_after(base, me, "erank"),
            "erank_without": _mean_after(base, me, "erank_without_massive"),
            "cos_others_removed": _mean_after(removed, me, "mean_cos_without_massive"),
            "erank_others_removed": _mean_after(removed, me, "erank_without_massive"),
        }
        rows.append([ref, me, f"{e['cos_with']:.3f}", f"{e['cos_without']:.3f}", f"{e['erank_with']:.2f}",
                     f"{e['erank_without']:.2f}", f"{e['cos_others_removed']:.3f}", f"{e['erank_others_removed']:.2f}"])
    table = markdown_table(
        ["model", "ME Layer", "mean cos, all tokens", "mean cos, without massive token", "eRank, all tokens",
         "eRank, without massive token", "other tokens' mean cos, massive activation removed",
         "other tokens' eRank, massive activation removed"], rows)
    # The claim predicts: the massive token's presence lowers diversity (raises cos), and
    # removing the massive activation makes the other tokens more diverse (lowers their cos).
    supports = {ref: (e["cos_with"] > e["cos_without"], e["cos_others_removed"] < e["cos_without"])
                for ref, e in effects.items()}
    n = sum(a + b for a, b in supports.values())
    verdict = verdict_for(all_hold=n == 4, any_hold=n > 0)
    s, g = effects["smollm2-135m"], effects["gemma3-270m"]
    measured = (
        f"Averaged over the layers after the ME Layer, SmolLM2's attention input has a mean pairwise cosine of "
        f"{s['cos_with']:.3f} with the massive token and {s['cos_without']:.3f} without it (eRank {s['erank_with']:.2f} "
        f"and {s['erank_without']:.2f}), so including it makes the set more diverse, not less. Removing the massive "
        f"activation at the ME Layer changes the other tokens' mean cosine from {s['cos_without']:.3f} to "
        f"{s['cos_others_removed']:.3f}. Gemma 3: {g['cos_with']:.3f} with, {g['cos_without']:.3f} without, "
        f"{g['cos_others_removed']:.3f} for the other tokens once the activation is removed."
    )
    reason = (
        "With these metrics (mean pairwise cosine and effective rank of the attention input per prompt) the "
        "massive token is the most distinct row of the attention input, and removing the massive activation "
        "does not make the other tokens more diverse. The paper's metric is not published; it may measure "
        "diversity in another space (keys or values, or across inputs), where the result could differ."
        if verdict != "holds" else
        "The massive token's presence lowers diversity, and removing it raises the other tokens' diversity."
    )
    return Finding(title="The massive token lowers attention-input diversity", verdict=verdict, table=table,
                   claim="The massive token's invariance lowers the diversity of the hidden representations "
                         "that reach attention.",
                   measured=measured, reason=reason, stores=stores, figures=figures)
