"""One self-contained HTML report from any set of run files.

Each run file becomes a section with its summary tables, its figures (PNG files that sit
next to the run file and share its name stem, embedded as data URIs) and its provenance:
model, weights sha256, package versions and the spec. The page needs no network and no
other file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import xarray as xr

from mechme.store.runfile import open_run

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img.figure { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: .8em; }
.verdict { background: #eef6ee; padding: .6em; border-left: 4px solid #4a4; }
"""


# Records how many figures decoded, as data-figures="rendered/total" on <body>, so a
# headless browser can check the page.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.figures = ok + '/' + imgs.length;
});
"""


def write_report(paths: list[str | Path], out: str | Path = "report.html") -> Path:
    """Write the report for ``paths`` to ``out`` (atomically) and return its path."""
    sections = [_section(Path(p)) for p in paths]
    body = "\n".join(sections)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mechme report</title>"
        f"<style>{STYLE}</style></head><body><h1>mechme report</h1>"
        f"<p>{len(paths)} run file(s).</p>{body}<script>{CHECK_SCRIPT}</script></body></html>"
    )
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def _section(path: Path) -> str:
    ds = open_run(path)
    kind = ds.attrs.get("mechme_kind", "run")
    model = ds.attrs.get("mechme_model", "")
    parts = [f"<h2>{html.escape(kind)}: {html.escape(model)} <small>({html.escape(path.name)})</small></h2>"]
    verdict = ds.attrs.get("mechme_verdict")
    if verdict:
        parts.append(f"<p class='verdict'>{html.escape(json.loads(verdict).get('text', ''))}</p>")
    parts.append(_tables(ds, kind))
    for figure in sorted(path.parent.glob(f"{path.stem}*.png")):
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img class='figure' alt='{html.escape(figure.name)}' src='data:image/png;base64,{data}'>")
    parts.append(_provenance(ds))
    return "\n".join(parts)


def _tables(ds: xr.Dataset, kind: str) -> str:
    if kind == "scan":
        rows = []
        for layer in ds.layer.values:
            sel = ds.sel(layer=layer)
            top = float(np.abs(sel.top_value.isel(rank=0)).max())
            median = float(sel.layer_median)
            rows.append([int(layer), f"{top:.4g}", f"{median:.3g}", f"{top / median:.0f}",
                         f"{float(sel.massive_share):.0%}"])
        return _html_table(["layer", "top-1 |a|", "median |a|", "ratio", "prompts massive"], rows)
    if kind == "study":
        from mechme.engine.study import StudyResult

        summary = StudyResult(ds, None).summary()
        rows = [[name, _fmt(v["massive_max"]), {True: "yes", False: "no", None: "-"}[v["emerges"]],
                 f"{v['kl']:.4f}", f"{v['loss_delta']:+.4f}", f"{v['top1_agree']:.3f}"]
                for name, v in summary.items()]
        return _html_table(["condition", "massive max", "emerges", "KL", "loss change", "top-1 agree"], rows)
    rows = []
    for name, var in ds.data_vars.items():
        values = np.asarray(var.values)
        summary = f"{float(np.nanmean(values)):.4g}" if values.dtype.kind in "fiub" and values.size else "-"
        rows.append([name, " x ".join(f"{d}={n}" for d, n in zip(var.dims, var.shape)), summary])
    return _html_table(["variable", "shape", "mean"], rows)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th class='{'l' if i == 0 else ''}'>{html.escape(str(h))}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td class='{'l' if i == 0 else ''}'>{html.escape(str(c))}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _provenance(ds: xr.Dataset) -> str:
    info = {
        "model": ds.attrs.get("mechme_model", ""),
        "weights sha256": ds.attrs.get("mechme_weights_sha256", ""),
        "spec hash": ds.attrs.get("mechme_spec_hash", ""),
        "mechme": ds.attrs.get("mechme_version", ""),
    }
    versions = json.loads(ds.attrs.get("mechme_versions", "{}"))
    rows = [[k, v] for k, v in info.items()] + [[k, v] for k, v in versions.items()]
    spec = json.dumps(json.loads(ds.attrs.get("mechme_spec", "{}")), indent=2)
    return (
        "<h3>Provenance</h3>" + _html_table(["field", "value"], rows)
        + f"<details><summary>spec</summary><pre>{html.escape(spec)}</pre></details>"
    )
