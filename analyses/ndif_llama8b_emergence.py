"""Emergence on Llama-3.1-8B, hosted on NDIF: the same scan, run remotely.

Run with `mechme run analyses/ndif_llama8b_emergence.py --remote ndif` after
`export NDIF_API_KEY=...`. Every trace is serialised and run on NDIF; only per-layer
summaries come back, and the run file is written here.

With `--remote local` (what the tests use) the same code runs on the bundled SmolLM2
through nnsight's local simulation of the remote path, which serialises each trace as
NDIF would, so a user with a key runs exactly what was tested.
"""

from pathlib import Path

from mechme.engine.scan import scan
from mechme.findings import Finding, markdown_table
from mechme.models import load_model

REMOTE_MODEL = "ndif:meta-llama/Llama-3.1-8B"
LOCAL_STAND_IN = "smollm2-135m"


def analysis(out: Path, remote: str | None = None) -> Finding:
    if remote == "ndif":
        model = load_model(REMOTE_MODEL)
    else:
        model = load_model(LOCAL_STAND_IN, remote="local")
    result = scan(model=model, out=out, progress=False, batch_size=8, seq_len=64)
    v = result.verdict
    table = markdown_table(
        ["model", "ME Layer", "massive dims", "jump", "prompts agreeing", "branch"],
        [[model.ref, v["me_layer"], ", ".join(map(str, v["massive_dims"][:3])),
          "-" if v["jump"] is None else f"{v['jump']:.0f}x", f"{v['share']:.0%}", v["branch"]]],
    )
    return Finding(
        title=f"Emergence on {model.ref} (remote: {model.remote})",
        claim="Massive activations first appear in one layer and persist, across model families and sizes.",
        measured=v["text"],
        verdict="holds" if v["me_layer"] is not None and (v["persists_share"] or 0) >= 0.7 else "partly holds",
        reason="The scan ran through the remote path; its verdict is above.",
        table=table, figures=[result.figure] if result.figure else [], stores=[result.store] if result.store else [],
    )
