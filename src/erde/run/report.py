"""The evaluation report as typed data (`report.json`), and the markdown table commands print.

`erde evaluate` writes a `Report`; `erde compare`, `erde export` and `erde bench` read it back with
`read_report`, which checks the file once against the dataclasses' field types (`erde.run.formats`),
so no reader indexes a dict by string keys. Accuracy is a fraction and MACs are per image. This
module imports no evaluation code: anything may use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from annotated_types import MinLen
from pydantic import AfterValidator, ConfigDict, TypeAdapter, with_config
from typing_extensions import TypedDict

from erde.errors import ErdeError
from erde.files import read_json, sha256_file, write_json
from erde.run.formats import (
    VERSION_KEY,
    ExitMacs,
    FieldProblem,
    Flag,
    Measured,
    Number,
    Sha256,
    Text,
    Whole,
    check_version,
    validate,
)
from erde.run.layout import RunDir

# 2: the report names its format version. Version 1 did not; its reports written before
# `chosen_by` existed also numbered the teacher exits from 0 (`_from_version_1`).
FORMAT_VERSION = 2
FIX = "rewrite it with `erde evaluate RUN --refresh` (RUN: the run it reports on)"
PerExit = Annotated[list[Measured], MinLen(1)]  # one number per exit (accuracies, shares)


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen on the validation split by `criterion`, and what it gives on test.

    The one meaning of "operating point" (docs/method.md, "Evaluation protocol"): the threshold
    and its validation numbers justify the choice; the test numbers are reported, never searched.
    `reached` is False when an accuracy target was met at no threshold on val, so the point fell
    back to the full model (threshold 0) and is no saving. The reductions say how many times fewer
    MACs per test image it spends than the reference and than the run's own full model.
    """

    threshold: Measured
    criterion: Text
    val_accuracy: Measured
    val_expected_macs: Measured
    test_accuracy: Measured
    test_expected_macs: Measured
    test_exit_share: PerExit
    reduction_vs_reference: Measured
    reduction_vs_own_full: Measured
    reached: Flag = True


@dataclass(frozen=True)
class Reference:
    """The model whose accuracy a student must keep (by default the teacher's final exit) and
    `macs`, what it costs per image when deployed as a plain network."""

    label: Text
    val_accuracy: Measured
    test_accuracy: Measured
    macs: Measured


@dataclass(frozen=True)
class ExitDiagnostics:
    """What one exit does on the test split, for the mechanism ERDE claims to move.

    `ece`: expected calibration error of the max probability (`Diagnostics.ece_bins` equal-width
    bins). `auroc`: how well the exit score (lower = more confident) separates the exit's right
    answers from its wrong ones; None when it is right on every test image or wrong on every one.
    The teacher entries (None without a reference run, or when no image is in the group):
    `teacher_exit`, the reference exit (numbered from 1, as in every report) that decides
    "teacher right"; the mean exit score
    on images it gets right and wrong; and, at the chosen point, the share of the images the
    reference's final exit gets wrong that leave here.
    """

    ece: Number
    auroc: Number | None
    teacher_exit: Whole | None
    mean_score_teacher_right: Number | None
    mean_score_teacher_wrong: Number | None
    teacher_wrong_exit_share: Number | None


@dataclass(frozen=True)
class Diagnostics:
    """Calibration, ranking and teacher-wrong images per exit, on the test split.

    `teacher_note` says which reference exits decide right and wrong, or why there are none.
    At the chosen point: `early_exit_share` of the test images leave before the last exit and
    `early_exit_error` of those are wrong (None when none leaves early); `teacher_wrong_share` is
    the share of test images the reference's final exit gets wrong, `teacher_wrong_images` how
    many they are (None also in reports written before it was recorded).
    """

    ece_bins: Whole
    teacher_note: Text
    teacher_wrong_share: Number | None
    early_exit_share: Measured
    early_exit_error: Number | None
    per_exit: Annotated[list[ExitDiagnostics], MinLen(1)]
    teacher_wrong_images: Whole | None = None


@with_config(ConfigDict(extra="forbid"))
class PerSplit(TypedDict):
    """One accuracy per exit on each split."""

    val: PerExit
    test: PerExit


OWN_REFERENCE = "the run's own final exit"


def keep_label(reference_label: str, max_drop_points: float) -> str:
    """The accuracy rule's name: the fewest val MACs that keep the reference's val accuracy."""
    return f"keep {reference_label} val accuracy - {max_drop_points:g} pt"


def budget_label(budget: float) -> str:
    """A MACs budget rule's name: a fraction of the full model (at most 1) or MACs per image."""
    if budget <= 1:
        return f"budget {100 * budget:g}% of full MACs"
    return f"budget {budget / 1e6:.2f} M MACs per image"


def criterion_text(rule: str, policy: str, normalize: bool) -> str:
    """A rule with the exit policy it was calibrated for, as messages name it."""
    return f"{rule} ({policy} policy{', normalised' if normalize else ''})"


@dataclass(frozen=True)
class Report:
    """Everything `erde evaluate` states about one run (`report.json`).

    `per_exit_accuracy` maps "val" and "test" to one accuracy per exit; `at_budget_fraction` maps
    a budget (a fraction of the full model, as text) to its point, or None when the budget is below
    the first exit's cost; `chosen` is the point `erde export` deploys and `chosen_by` names the
    rule that chose it (`keep_label` or `budget_label`), so a later evaluation can tell whether it
    would deploy another rule.
    """

    run: Text
    model: Text
    method: Text
    seed: Whole
    policy: Text
    normalize: Flag
    exit_macs: ExitMacs
    per_exit_accuracy: PerSplit
    test_auc: Measured
    reference: Reference
    max_drop_points: Measured
    at_reference_accuracy: OperatingPoint
    at_own_full_accuracy: OperatingPoint
    at_budget_fraction: dict[str, OperatingPoint | None]
    chosen: OperatingPoint
    chosen_by: Text
    diagnostics: Diagnostics | None = None
    # The weights the logits came from (None: a version-1 report, which did not say): a
    # threshold belongs to its weights, see `read_current_report`.
    weights_sha256: Sha256 | None = None

    @property
    def criterion(self) -> str:
        """The rule behind `chosen` with its policy: equal for two reports that deploy alike."""
        return criterion_text(self.chosen_by, self.policy, self.normalize)

    def write(self, path: Path) -> None:
        """`report.json`, atomically, with its format version; NaN (an empty split) becomes
        null."""
        write_json(path, {VERSION_KEY: FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, raw: Any, path: Path | str = "report.json") -> Report:
        """A report of any version this erde reads; a damaged or foreign file is a one-line
        message naming the field, not a KeyError."""
        return validate(
            _ADAPTER, check_version(raw, path, FORMAT_VERSION, MIGRATIONS, FIX), path, FIX
        )


def _one_entry_per_exit(report: Report) -> Report:
    d = report.diagnostics
    if d is not None and len(d.per_exit) != len(report.exit_macs):
        raise FieldProblem("diagnostics.per_exit", "must hold one entry per exit")
    return report


_ADAPTER = TypeAdapter(Annotated[Report, AfterValidator(_one_entry_per_exit)])


def _from_version_1(raw: dict) -> dict:
    """Version 1 is version 2 without the key, except the reports of erde before `chosen_by`
    existed, which numbered the teacher exits from 0: they gain the rule the chosen point
    shows (`_earlier_rule`) and teacher exits numbered from 1."""
    if "chosen_by" in raw:
        return raw
    raw = {**raw, "chosen_by": _earlier_rule(raw)}
    diagnostics = raw.get("diagnostics")
    if isinstance(diagnostics, dict) and isinstance(diagnostics.get("per_exit"), list):
        per_exit = [_teacher_exit_from_one(x) for x in diagnostics["per_exit"]]
        raw["diagnostics"] = {**diagnostics, "per_exit": per_exit}
    return raw


MIGRATIONS = {1: _from_version_1}


def _earlier_rule(raw: dict) -> Any:
    """The rule of a report written before `chosen_by` existed: the accuracy rule unless the
    chosen point is one of the budget points (None, refused as damage, when the entries it
    needs are damaged)."""
    chosen, reference = raw.get("chosen"), raw.get("reference")
    budgets, drop = raw.get("at_budget_fraction"), raw.get("max_drop_points")
    if chosen is not None and chosen == raw.get("at_reference_accuracy"):
        label = reference.get("label") if isinstance(reference, dict) else None
        if isinstance(label, str) and isinstance(drop, (int, float)):
            return keep_label(label, drop)
        return None
    for fraction, point in budgets.items() if isinstance(budgets, dict) else ():
        if point is not None and point == chosen:
            try:
                return budget_label(float(fraction))
            except ValueError:
                return None
    return "a MACs budget this report does not record"


def _teacher_exit_from_one(entry: Any) -> Any:
    """An earlier report's 0-based teacher exit, numbered from 1 as reports are now."""
    exit_index = entry.get("teacher_exit") if isinstance(entry, dict) else None
    if isinstance(exit_index, int) and not isinstance(exit_index, bool):
        return {**entry, "teacher_exit": exit_index + 1}
    return entry


def read_report(path: str | Path) -> Report:
    """The `report.json` of `erde evaluate`, validated once (a clear message if it is not one)."""
    return Report.from_json(read_json(Path(path), "evaluation report"), path)


def read_current_report(run_dir: str | Path, weights_sha256: str | None = None) -> Report | None:
    """RUN/eval/report.json (None if there is none), refused unless it was computed from the
    weights the run holds now: a resumed or retrained run, or a report written there for
    another run (`erde evaluate A --out B/eval`), would deploy a threshold chosen for other
    weights. `weights_sha256`: the digest of the weights the caller loaded (default: of the
    file as it is now), so the threshold is checked against the weights it ships with."""
    run = RunDir(run_dir)
    path = run.eval.report_json
    if not path.is_file():
        return None
    report = read_report(path)
    if report.weights_sha256 != (weights_sha256 or sha256_file(run.weights)):
        why = (
            "does not say which weights it was computed from (an older erde wrote it)"
            if report.weights_sha256 is None
            else f"was computed from other weights than {run.weights} (the run was resumed "
            "or retrained since, or the report was written for another run)"
        )
        raise ErdeError(f"{path} {why}; run `erde evaluate {run.path}` again")
    return report


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant digits, other values ``str``."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, headers have {len(headers)}: {row}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
