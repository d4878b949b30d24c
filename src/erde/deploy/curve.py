"""The val curve an export carries, and the threshold it gives for a MACs budget, with numpy only
(a serving machine retargets an export without PyTorch or the run folder).

The curve `erde evaluate` sweeps holds up to 1000 thresholds; a budget's choice (the highest val
accuracy within the budget; ties: fewer MACs, then the lower threshold, as
`erde.evaluation.calibrate.calibrate_for_budget` chooses) only ever falls on its frontier: the
points, by increasing MACs, whose accuracy beats every cheaper point's. The manifest keeps those,
so choosing from it gives the threshold the full curve gives, for every budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from erde.deploy.manifest import CURVE_NOTE, Manifest
from erde.errors import ErdeError

if TYPE_CHECKING:
    from erde.evaluation.sweep import Curve


def frontier(curve: Curve, images: int) -> dict:
    """The manifest's `val_curve` block from a sweep of `images` val images."""
    accuracy, expected_macs = curve.accuracy, curve.expected_macs
    order = np.lexsort((curve.thresholds, -accuracy, expected_macs))
    points, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            best = float(accuracy[i])
            points.append(
                {
                    "threshold": float(curve.thresholds[i]),
                    "val_accuracy": best,
                    "expected_macs": float(expected_macs[i]),
                    "exit_share": [float(v) for v in curve.exit_share[i]],
                }
            )
    return {"images": int(images), "note": CURVE_NOTE, "points": points}


def choose_threshold(manifest: Manifest, budget: float) -> dict:
    """The val curve's point for a MACs budget (`budget` <= 1: a fraction of the full model's
    MACs, else MACs per image); ErdeError for a budget the model cannot spend or an export
    without a curve."""
    macs = manifest.info.exit_macs
    if not budget > 0 or math.isinf(budget):
        raise ErdeError(
            f"a MACs budget must be a positive number; got {budget}. Use a fraction of the "
            "full model (e.g. 0.5) or MACs per image (e.g. 2e7)"
        )
    per_image = budget * macs[-1] if budget <= 1 else float(budget)
    if per_image < macs[0]:
        raise ErdeError(
            f"a MACs budget of {per_image:.6g} per image is below the first exit's cost "
            f"({macs[0]} MACs); give at least that"
        )
    if per_image > macs[-1]:
        raise ErdeError(
            f"a MACs budget of {per_image:.6g} per image is above the full model's {macs[-1]} "
            "MACs; give at most that (or a fraction <= 1)"
        )
    if manifest.val_curve is None:
        raise ErdeError(
            "this export holds no val curve (its run had no `erde evaluate`, or a format-3 "
            "export); evaluate the run and export it again"
        )
    within = [p for p in manifest.val_curve["points"] if p["expected_macs"] <= per_image]
    if not within:
        raise ErdeError(
            f"no threshold of the val curve spends at most {per_image:.6g} MACs per image; "
            "give a larger budget"
        )
    return within[-1]
