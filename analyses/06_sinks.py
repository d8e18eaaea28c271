"""Sinks: WeMask, and removing the massive activation, weaken attention sinks.

WeMask here is the fixed `FALLBACK` setting (dims=activation, k=2, the layers after the
ME Layer, gamma 1, the massive token), not the model's recorded `--wemask default`: that
one changes whenever a sweep runs, and the finding must not depend on the machine's cache.
"""

from pathlib import Path

from mechme.findings import Finding, markdown_table, verdict_for
from mechme.measures.sinks import measure_sinks
from mechme.mitigation.wemask import FALLBACK, WeMask
from mechme.models import load_model
from mechme.specs import Condition, Intervention, Tokens, Zero


def analysis(out: Path, remote: str | None = None) -> Finding:
    rows, stores, figures, summaries = [], [], [], {}
    for ref in ("smollm2-135m", "gemma3-270m"):
        model = load_model(ref, remote=remote)
        mask = WeMask(model, FALLBACK)
        conditions = [
            Condition(name="remove-massive", interventions=(
                Intervention(site="mlp_out", layers=(mask.me_layer,), op=Zero(), tokens=Tokens.first()),)),
            mask.as_condition("wemask"),
        ]
        ds, summary = measure_sinks(model, conditions=conditions, out=out, progress=False)
        summaries[ref] = summary
        if summary.get("store"):
            stores.append(Path(summary["store"]))
        if summary.get("figure"):
            figures.append(Path(summary["figure"]))
        for name in ("baseline", "remove-massive", "wemask"):
            s = summary if name == "baseline" else summary["conditions"][name]
            after = s.get("sink_rate_after_me_layer")
            first = sum(x["mean_attention_to_first"] for x in s["layers"]) / len(s["layers"])
            rows.append([ref, name if name != "wemask" else f"wemask ({mask.spec.describe()})",
                         f"{s['sink_rate']:.1f}%", "-" if after is None else f"{after:.1f}%", f"{first:.3f}"])
    table = markdown_table(["model", "condition", "sink rate (all layers)", "sink rate after the ME Layer",
                            "mean attention to first token"], rows)
    weaker = {ref: {name: s["conditions"][name]["sink_rate"] < s["sink_rate"] for name in ("remove-massive", "wemask")}
              for ref, s in summaries.items()}
    n = sum(v for w in weaker.values() for v in w.values())
    verdict = verdict_for(all_hold=n == 4, any_hold=n > 0)
    smol = summaries["smollm2-135m"]
    measured = (
        f"SmolLM2: sink rate {smol['sink_rate']:.1f}% at baseline (epsilon {smol['epsilon']}, {smol['seq_len']} tokens), "
        f"{smol['conditions']['remove-massive']['sink_rate']:.1f}% without the massive activation and "
        f"{smol['conditions']['wemask']['sink_rate']:.1f}% with WeMask. The table gives both models."
    )
    g = summaries["gemma3-270m"]
    reason = (
        f"Both interventions lower the sink rate on both models, and WeMask weakens sinks without removing them "
        f"({smol['conditions']['wemask']['sink_rate']:.1f}% against {smol['sink_rate']:.1f}% on SmolLM2, "
        f"{g['conditions']['wemask']['sink_rate']:.1f}% against {g['sink_rate']:.1f}% on Gemma 3). Removing the "
        f"massive activation cuts SmolLM2's sinks after its ME Layer to "
        f"{smol['conditions']['remove-massive']['sink_rate_after_me_layer']:.1f}%, but barely moves Gemma 3's "
        f"({g['conditions']['remove-massive']['sink_rate']:.1f}%), whose later layers rebuild the activation. "
        "SmolLM2 also has sinks before its ME Layer (layers 3-9), so not every sink comes from it."
    )
    return Finding(title="WeMask and removing the massive activation weaken sinks", verdict=verdict, table=table,
                   claim="Attention sinks follow from the massive activation; WeMask weakens them without "
                         "removing them.",
                   measured=measured, reason=reason, stores=stores, figures=figures)
