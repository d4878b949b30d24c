"""DEPLOY.md, written beside `manifest.json` by `erde export`: the manifest in prose, for the
engineer who calls the graphs from another runtime. Generated from the manifest's JSON alone, so
every number and rule in it is the manifest's (tests/test_deploy_md.py checks that).
"""

from __future__ import annotations

from typing import Any

# At most this many val-curve points in the table (the manifest holds them all).
CURVE_ROWS = 8


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _tensors(entry: dict) -> str:
    return "; ".join(
        f"`{t['name']}` ({' x '.join(map(str, t['shape']))}): {t.get('meaning', '')}" for t in entry
    )


def _curve(curve: dict | None) -> list[str]:
    if curve is None:
        return [
            "This export holds no val curve (its run was not evaluated): evaluate the run and "
            "export it again to retarget it to another budget."
        ]
    points = curve["points"]
    step = max(1, -(-len(points) // CURVE_ROWS))
    shown = points[::step] if points[::step][-1] is points[-1] else [*points[::step], points[-1]]
    rows = [[p["threshold"], p["val_accuracy"], round(p["expected_macs"])] for p in shown]
    return [
        f"`val_curve.points` in manifest.json holds {len(points)} points measured on "
        f"{curve['images']} validation images: {curve['note']}. A few of them:",
        "",
        *_table(["threshold", "val accuracy", "expected MACs per image"], rows),
    ]


def deploy_md(manifest: dict) -> str:
    """The text of DEPLOY.md for a manifest (`Manifest.to_json()`)."""
    p, e = manifest["preprocess"], manifest["exits"]
    size, channels, count = p["input_size"], p["in_channels"], e["count"]
    pieces = manifest["pieces"]
    lines = [
        f"# Deploying {manifest['model']} ({manifest['method']}, {manifest['precision']})",
        "",
        "Written by `erde export` from `manifest.json`, which says the same for programs. "
        f"Classes, in output order: {', '.join(manifest['classes'])}.",
        "",
        "## Input",
        "",
        f"1. Decode the file with {p['decode']}; the model reads {p['channels']} images "
        f"({channels} channel(s)).",
        f"2. Resize the {p['resize']['side']} side to {p['resize']['to']} pixels and the longer "
        f"to {p['resize']['longer']}, {p['resize']['filter']}.",
        f"3. Cut out the {p['crop']['where']} {p['crop']['size']} x {p['crop']['size']} "
        f"({p['crop']['offset']}).",
        f"4. Scale and normalise per channel: {p['normalise']}, with mean {p['mean']} and std "
        f"{p['std']}.",
        f"5. Feed {p['dtype']} in {p['layout']} layout: N x {channels} x {size} x {size}.",
        "",
        "## Exit rule",
        "",
        f"Exits are numbered {e['numbering']}, 1 to {count}. Each piece but the last computes "
        f"its exit score inside the graph: {e['score']} (policy `{e['policy']}`). Rule: "
        f"{e['rule']}. Threshold: {_cell(e['threshold'])} ({manifest['threshold_source']}).",
        "",
        *_table(
            ["exit", "piece", "cumulative MACs per image"],
            [
                [k + 1, pc["file"], m]
                for k, (pc, m) in enumerate(zip(pieces, e["macs"], strict=True))
            ],
        ),
        "",
        f"The plain network (`{manifest['static']['file']}`, no intermediate exits) costs "
        f"{e['static_macs']} MACs per image.",
        "",
        "## Graphs",
        "",
        "Any batch, piece by piece: run the first piece on the batch; images whose score is "
        "below the threshold take that exit's logits; give the others' features to the next "
        "piece, and so on; the last piece answers the rest.",
        "",
    ]
    for pc in pieces:
        lines.append(
            f"- `{pc['file']}` (exit {pc['exit']}): in {_tensors(pc['inputs'])}. "
            f"Out {_tensors(pc['outputs'])}."
        )
    single, static = manifest["single"], manifest["static"]
    lines += [
        f"- `{single['file']}`, one image in one call (the exit decided by `If` nodes inside): "
        f"in {_tensors(single['inputs'])}. Out {_tensors(single['outputs'])}.",
        f"- `{static['file']}`: in {_tensors(static['inputs'])}. "
        f"Out {_tensors(static['outputs'])}.",
        "",
        "## Another budget",
        "",
        *_curve(manifest["val_curve"]),
        "",
    ]
    return "\n".join(lines)
