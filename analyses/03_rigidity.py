"""Rigidity: after the ME Layer the massive token's state barely changes across layers and inputs."""

from pathlib import Path

from mechme.findings import Finding, markdown_table
from mechme.measures.rigidity import measure_rigidity
from mechme.models import load_model


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def analysis(out: Path, remote: str | None = None) -> Finding:
    rows, stores, figures, summaries = [], [], [], {}
    for ref in ("smollm2-135m", "gemma3-270m"):
        ds, summary = measure_rigidity(load_model(ref, remote=remote), out=out, progress=False)
        summaries[ref] = summary
        if summary.get("store"):
            stores.append(Path(summary["store"]))
        figures += [Path(f) for f in summary.get("figures", []) if "rigidity" in Path(f).name]
        after = summary["after_me_layer"]
        rows.append([ref, summary["me_layer"], _fmt(after["cos_prev_min"]), _fmt(after["cos_across_prompts_min"]),
                     _fmt(after["ordinary_cos_prev_mean"]), _fmt(after["ordinary_cos_across_prompts_mean"])])
    table = markdown_table(
        ["model", "ME Layer", "massive token: min cos with previous layer", "massive token: min cos across prompts",
         "ordinary tokens: mean cos with previous layer", "ordinary tokens: mean cos across prompts"], rows)
    fixed = all(s["after_me_layer"]["cos_prev_min"] > 0.9 and s["after_me_layer"]["cos_across_prompts_min"] > 0.9
                for s in summaries.values())
    contrast = all(s["after_me_layer"]["ordinary_cos_across_prompts_mean"] < s["after_me_layer"]["cos_across_prompts_min"]
                   for s in summaries.values())
    verdict = "holds" if fixed and contrast else ("partly holds" if fixed or contrast else "does not hold")
    smol = summaries["smollm2-135m"]["after_me_layer"]
    gemma = summaries["gemma3-270m"]["after_me_layer"]
    measured = (
        f"After the ME Layer, the massive token's residual state has a cosine of at least {smol['cos_prev_min']:.3f} "
        f"with the previous layer and at least {smol['cos_across_prompts_min']:.3f} across prompts on SmolLM2 "
        f"(Gemma 3: {gemma['cos_prev_min']:.3f} and {gemma['cos_across_prompts_min']:.3f}). Ordinary tokens average "
        f"{smol['ordinary_cos_prev_mean']:.3f} between layers and {smol['ordinary_cos_across_prompts_mean']:.3f} "
        f"across prompts on SmolLM2 (Gemma 3: {gemma['ordinary_cos_prev_mean']:.3f} and "
        f"{gemma['ordinary_cos_across_prompts_mean']:.3f})."
    )
    reason = ("The massive token's state is nearly the same vector at every later layer and for every input, "
              "and ordinary tokens are not fixed that way." if verdict == "holds" else
              "See the table: the thresholds used are cosine > 0.9 for the massive token, and ordinary tokens "
              "must be less similar across prompts than it.")
    return Finding(title="The massive token's state is rigid", verdict=verdict, table=table,
                   claim="After the ME Layer, the massive-activation token's representation stays largely unchanged "
                         "across layers and across inputs.",
                   measured=measured, reason=reason, stores=stores, figures=figures)
