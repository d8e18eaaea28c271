"""Emergence: massive activations appear abruptly at one layer, then persist.

Scans SmolLM2-135M and Gemma 3 270M on the bundled sentences, and a tiny random Llama
with a massive activation planted at layer 2 (dim 17) as a control with a known answer.
"""

from pathlib import Path

from mechme.engine.scan import scan
from mechme.findings import Finding, markdown_table
from mechme.models import load_model
from mechme.models.tiny import Plant, tiny_model


def analysis(out: Path, remote: str | None = None) -> Finding:
    rows, figures, stores, verdicts = [], [], [], {}
    models = [("smollm2-135m", None), ("gemma3-270m", None),
              ("tiny llama, planted at layer 2 dim 17", tiny_model("llama", plant=Plant(layer=2, dim=17)))]
    for name, model in models:
        if model is None:
            model = load_model(name, remote=remote)
        result = scan(model=model, out=out, progress=False)
        v = result.verdict
        verdicts[name] = v
        figures.append(result.figure)
        stores.append(result.store)
        rows.append([name, v["me_layer"], ", ".join(map(str, v["massive_dims"][:3])), f"{v['top1']:.4g}",
                     f"{v['jump']:.0f}x", f"{v['share']:.0%}", v["branch"], f"{v['persists_share']:.0%}"])
    table = markdown_table(
        ["model", "ME Layer", "massive dims", "top-1 magnitude (median prompt)", "jump from layer before",
         "prompts agreeing", "writing branch", "later layers still massive"], rows)
    smol, gemma = verdicts["smollm2-135m"], verdicts["gemma3-270m"]
    control = verdicts["tiny llama, planted at layer 2 dim 17"]
    abrupt = smol["jump"] > 50 and gemma["jump"] > 50
    persists = smol["persists_share"] >= 0.8 and gemma["persists_share"] >= 0.7
    verdict = "holds" if abrupt and persists and control["me_layer"] == 2 else "partly holds"
    measured = (
        f"SmolLM2's top value jumps {smol['jump']:.0f}x at layer {smol['me_layer']} (dim "
        f"{smol['massive_dims'][0]}, first token, in {smol['share']:.0%} of prompts) and stays massive in "
        f"{smol['persists_share']:.0%} of later layers (the last two layers shrink it below the criterion). "
        f"Gemma 3's starts at layer {gemma['me_layer']} (dim {gemma['massive_dims'][0]} at <bos>), "
        f"{gemma['jump']:.0f}x its embedding, and persists in {gemma['persists_share']:.0%} of later layers, "
        "with a second dim, 163, taking over from layer 3. The planted control is found at layer "
        f"{control['me_layer']}, dim {control['massive_dims'][0]}."
    )
    reason = (
        "Both real models have one layer where the massive value first appears, far above the layer "
        "before, and the residual stream carries it through most later layers. On Gemma 3 the ME Layer "
        "is the first layer, so 'abrupt' is relative to the scaled embedding."
    )
    return Finding(title="Emergence at one layer, then persistence", verdict=verdict, table=table,
                   claim="Massive activations first appear in one layer (the ME Layer), at the FFN, and the "
                         "residual connections carry them into deeper layers.",
                   measured=measured, reason=reason, figures=figures, stores=stores)
