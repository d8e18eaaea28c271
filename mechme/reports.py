"""Plain-text tables for the terminal."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format ``rows`` as an aligned table; ``columns`` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def format_scan(result) -> str:
    data = result.to_json()
    me = data["me_layer"]
    rows = []
    for row in data["layers"]:
        row = dict(row)
        row["mark"] = "<- ME Layer" if row["layer"] == me else ""
        row["share"] = f"{row['massive_share']:.0%}"
        rows.append(row)
    table = format_table(
        rows,
        [
            ("layer", "layer", ""),
            ("top1", "top-1 |a| (max)", ".4g"),
            ("median", "median |a|", ".3g"),
            ("ratio", "top-1/median", ".0f"),
            ("massive_count", "massive", ""),
            ("share", "prompts", ""),
            ("mark", "", ""),
        ],
    )
    lines = [f"model {data['model']}: {result.dataset.sizes['prompt']} prompts", table, "", data["verdict"]]
    if result.store:
        note = " (reused a finished run)" if result.reused else ""
        lines += ["", f"run file: {result.store}{note}", f"figure:   {result.figure}"]
    return "\n".join(lines)
