"""Choose WeMask settings on a validation split, never on the items that are reported.

`sweep` evaluates the unmasked model once and then every point of a settings grid on
the validation split of one task, records every point in a run file, and records the
best point as the model's default (``--wemask default``). Reports then use the test
split, which shares no item with validation (see `mechme.evaluation.tasks`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from mechme.errors import MechmeError, SpecError
from mechme.mitigation.wemask import WeMask, WeMaskSpec, record_default, repository_defaults_path
from mechme.models.loaded import LoadedModel
from mechme.store import runfile

DEFAULT_GRID = {
    "dims": ("gain", "activation", "massive"),
    "k": (2,),
    "layers": ("after_me", "next_only"),
    "gamma": (1.0, 0.5),
}


def grid_specs(grid: dict) -> list[WeMaskSpec]:
    """Return one spec per point of ``grid`` (keys: dims, k, layers, gamma, token)."""
    keys = ["dims", "k", "layers", "gamma", "token"]
    values = [tuple(grid.get(k, (WeMaskSpec.__dataclass_fields__[k].default,))) for k in keys]
    specs, seen = [], set()
    for combo in itertools.product(*values):
        spec = WeMaskSpec(**dict(zip(keys, combo)))
        if spec not in seen:
            seen.add(spec)
            specs.append(spec)
    if not specs:
        raise SpecError("the WeMask grid is empty; give at least one value for each option")
    return specs


def sweep(model: LoadedModel, *, task: str = "arc_easy", limit: int | None = 200, seed: int = 0,
          grid: dict | None = None, out: str | Path | None = "runs", progress: bool = True,
          record: bool = True, record_in_repository: bool = False, max_new_tokens: int | None = None) -> dict:
    """Evaluate a WeMask grid on the validation split of ``task``; return every point and the choice."""
    try:
        from mechme.evaluation.tasks import evaluate
    except ImportError as err:
        raise MechmeError(f"the sweep needs mechme.evaluation ({err})") from err

    specs = grid_specs(grid or DEFAULT_GRID)
    kwargs = dict(limit=limit, seed=seed, split="validation", out=None, progress=False,
                  max_new_tokens=max_new_tokens)
    baseline = evaluate(model, task, **kwargs)
    points = []
    bar = tqdm(specs, desc=f"sweep {task}", unit="point", disable=not progress, leave=False)
    for spec in bar:
        mask = WeMask(model, spec)
        with mask:
            result = evaluate(model, task, **kwargs)
        points.append({"spec": spec.to_dict(), "describe": spec.describe(), "layers": mask.layers,
                       "dims": None if mask.static_dims is None else mask.static_dims.tolist(),
                       "score": result["score"], "ci95": result["ci95"]})
    bar.close()

    best = max(points, key=lambda p: p["score"])
    chosen = WeMaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in best["spec"].items()})
    evidence = {"task": task, "split": "validation", "limit": limit, "seed": seed, "metric": baseline["metric"],
                "baseline_score": baseline["score"], "best_score": best["score"], "n": baseline["n"]}
    summary = {"model": model.ref, **evidence, "chosen": chosen.describe(), "chosen_spec": chosen.to_dict(),
               "points": points, "helps_on_validation": best["score"] > baseline["score"]}

    if out is not None:
        out = runfile.check_writable(out)
        identity = {"kind": "sweep", "model": model.ref, "weights_sha256": model.weights_sha256, "task": task,
                    "limit": limit, "seed": seed, "grid": [s.to_dict() for s in specs]}
        ds = xr.Dataset(
            {
                "score": (("point",), np.array([p["score"] for p in points], dtype=np.float64)),
                "ci_low": (("point",), np.array([p["ci95"][0] for p in points], dtype=np.float64)),
                "ci_high": (("point",), np.array([p["ci95"][1] for p in points], dtype=np.float64)),
            },
            coords={"point": np.arange(len(points)), "setting": (("point",), [p["describe"] for p in points])},
            attrs={"mechme_baseline_score": baseline["score"], "mechme_chosen": json.dumps(chosen.to_dict())},
        )
        store = out / f"sweep-{task}-{runfile.spec_hash(identity)[:12]}.h5"
        runfile.write_run(ds, store, kind="sweep", spec=identity, model_info=model.describe())
        summary["store"] = str(store)
    if record:
        summary["recorded"] = str(record_default(model.ref, chosen, evidence))
    if record_in_repository:
        path = repository_defaults_path(model.ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": chosen.to_dict(), "evidence": evidence}, indent=2) + "\n")
        summary["recorded_in_repository"] = str(path)
    return summary
