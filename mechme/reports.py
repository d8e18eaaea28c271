"""Plain-text tables for the terminal."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format ``rows`` as an aligned table; ``columns`` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    # An unlabelled column (such as a row marker) gets no rule.
    lines.insert(1, "  ".join(("-" if header else " ") * w for (_, header, _), w in zip(columns, widths)).rstrip())
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


def format_study(name: str, summary: dict, store) -> str:
    rows = [{"condition": c, **v} for c, v in summary.items()]
    for row in rows:
        row["emerges"] = {True: "yes", False: "no", None: "-"}[row["emerges"]]
    table = format_table(
        rows,
        [
            ("condition", "condition", ""),
            ("massive_max", "massive max |a|", ".4g"),
            ("emerges", "emerges", ""),
            ("kl", "KL vs baseline", ".4f"),
            ("loss_delta", "loss change", "+.4f"),
            ("top1_agree", "top-1 agree", ".3f"),
        ],
    )
    lines = [f"study {name}", table]
    if store:
        lines += ["", f"run file: {store}"]
    return "\n".join(lines)


def format_attribution(r: dict) -> str:
    lines = [
        f"model {r['model']}: ME Layer {r['me_layer']}, massive dim {r['massive_dim']}, "
        f"baseline max |a| {r['baseline_max']:.4g}",
        "",
        "FFN neurons by contribution to the massive entry (hidden x down_proj weight):",
        format_table(r["top_neurons"][:10], [("neuron", "neuron", ""), ("contribution", "contribution", ".4g")]),
        f"top {r['ablate_top']['n']} neurons carry {r['neuron_share_top']:.1%} of the MLP branch",
        "",
        f"MLP-side norm ({r['gain_role']}) gain dims by attribution (gain x gradient):",
        format_table(r["gain_dims"], [("dim", "dim", ""), ("gain", "gain", ".4g"), ("attribution", "attribution", ".4g")]),
        "",
        "causal checks (massive max |a| at the ME Layer):",
    ]
    checks = [{"condition": f"top {r['ablate_top']['n']} neurons zeroed", **r["ablate_top"]}]
    checks += [{"condition": f"random neurons, seed {x['seed']}", **x} for x in r["ablate_random"]]
    checks += [{"condition": f"top {r['ablate_gain_top']['n']} gain dims to mean", **r["ablate_gain_top"]}]
    checks += [{"condition": f"random gain dims, seed {x['seed']}", **x} for x in r["ablate_gain_random"]]
    lines.append(format_table(checks, [("condition", "condition", ""), ("massive_max", "massive max", ".4g"),
                                       ("emerges", "emerges", "")]))
    lines += ["", "joint check:"]
    joint = [{"condition": k, **v} for k, v in r["joint"].items()]
    lines.append(format_table(joint, [("condition", "condition", ""), ("massive_max", "massive max", ".4g"),
                                      ("emerges", "emerges", ""), ("kl", "KL", ".4f")]))
    lines += ["", "RMSNorm scale 1/rms at the MLP-side norm input:"]
    for layer, s in r["rms_scale"].items():
        other = f", other tokens {s['other_tokens']:.4g} ({s['ratio']:.0f}x)" if "other_tokens" in s else ""
        lines.append(f"  layer {layer}: massive token {s['massive_token']:.4g}{other}")
    if r.get("store"):
        lines += ["", f"run file: {r['store']}"]
    return "\n".join(lines)
