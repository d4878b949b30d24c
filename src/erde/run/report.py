"""The evaluation report as typed data (`report.json`), and the markdown table commands print.

`erde evaluate` writes a `Report`; `erde compare`, `erde export` and `erde bench` read it back with
`read_report`, which checks the file once, so no reader indexes a dict by string keys. Accuracy is
a fraction and MACs are per image. This module imports no evaluation code: anything may use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erde.errors import ErdeError
from erde.files import read_json, write_json


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen on the validation split by `criterion`, and what it gives on test.

    The one meaning of "operating point" (docs/method.md, "Evaluation protocol"): the threshold
    and its validation numbers justify the choice; the test numbers are reported, never searched.
    `reached` is False when an accuracy target was met at no threshold on val, so the point fell
    back to the full model (threshold 0) and is no saving. The reductions say how many times fewer
    MACs per test image it spends than the reference and than the run's own full model.
    """

    threshold: float
    criterion: str
    val_accuracy: float
    val_expected_macs: float
    test_accuracy: float
    test_expected_macs: float
    test_exit_share: list[float]
    reduction_vs_reference: float
    reduction_vs_own_full: float
    reached: bool = True


@dataclass(frozen=True)
class Reference:
    """The model whose accuracy a student must keep (by default the teacher's final exit) and
    `macs`, what it costs per image when deployed as a plain network."""

    label: str
    val_accuracy: float
    test_accuracy: float
    macs: float


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

    ece: float
    auroc: float | None
    teacher_exit: int | None
    mean_score_teacher_right: float | None
    mean_score_teacher_wrong: float | None
    teacher_wrong_exit_share: float | None


@dataclass(frozen=True)
class Diagnostics:
    """Calibration, ranking and teacher-wrong images per exit, on the test split.

    `teacher_note` says which reference exits decide right and wrong, or why there are none.
    At the chosen point: `early_exit_share` of the test images leave before the last exit and
    `early_exit_error` of those are wrong (None when none leaves early); `teacher_wrong_share` is
    the share of test images the reference's final exit gets wrong.
    """

    ece_bins: int
    teacher_note: str
    teacher_wrong_share: float | None
    early_exit_share: float
    early_exit_error: float | None
    per_exit: list[ExitDiagnostics]


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

    run: str
    model: str
    method: str
    seed: int
    policy: str
    normalize: bool
    exit_macs: list[float]
    per_exit_accuracy: dict[str, list[float]]
    test_auc: float
    reference: Reference
    max_drop_points: float
    at_reference_accuracy: OperatingPoint
    at_own_full_accuracy: OperatingPoint
    at_budget_fraction: dict[str, OperatingPoint | None]
    chosen: OperatingPoint
    chosen_by: str
    diagnostics: Diagnostics | None = None

    @property
    def criterion(self) -> str:
        """The rule behind `chosen` with its policy: equal for two reports that deploy alike."""
        return criterion_text(self.chosen_by, self.policy, self.normalize)

    def write(self, path: Path) -> None:
        """`report.json`, atomically; NaN (an empty split) becomes null."""
        write_json(path, self)

    @classmethod
    def from_json(cls, raw: Any, path: Path | str = "report.json") -> Report:
        """Checked entry by entry: a damaged or foreign file is a message, not a KeyError."""

        def bad(what: str) -> ErdeError:
            return ErdeError(
                f"evaluation report {path}: {what}; it was not written by this version of erde "
                "or is damaged: run `erde evaluate` on the run again"
            )

        earlier = isinstance(raw, dict) and "chosen_by" not in raw  # before exits were 1..n
        if earlier:
            raw = {**raw, "chosen_by": None}
        values = _entries(cls, raw, bad, "the report")
        for key in ("run", "model", "method", "policy"):
            _check(values[key], str, bad, key)
        _check(values["seed"], int, bad, "seed")
        _check(values["normalize"], bool, bad, "normalize")
        values["exit_macs"] = _numbers(values["exit_macs"], bad, "exit_macs")
        per_exit = values["per_exit_accuracy"]
        if not isinstance(per_exit, dict) or set(per_exit) != {"val", "test"}:
            raise bad("'per_exit_accuracy' must map 'val' and 'test' to accuracies")
        values["per_exit_accuracy"] = {
            s: _numbers(per_exit[s], bad, f"per_exit_accuracy.{s}") for s in ("val", "test")
        }
        values["test_auc"] = _number(values["test_auc"], bad, "test_auc")
        values["max_drop_points"] = _number(values["max_drop_points"], bad, "max_drop_points")
        values["reference"] = _reference(values["reference"], bad)
        for key in ("at_reference_accuracy", "at_own_full_accuracy", "chosen"):
            values[key] = _point(values[key], bad, key)
        budgets = values["at_budget_fraction"]
        if not isinstance(budgets, dict):
            raise bad("'at_budget_fraction' must be an object")
        values["at_budget_fraction"] = {
            k: None if p is None else _point(p, bad, f"at_budget_fraction.{k}")
            for k, p in budgets.items()
        }
        if values.get("diagnostics") is not None:
            values["diagnostics"] = _diagnostics(values["diagnostics"], bad)
            if len(values["diagnostics"].per_exit) != len(values["exit_macs"]):
                raise bad("'diagnostics.per_exit' must hold one entry per exit")
            if earlier:
                values["diagnostics"] = _teacher_exits_from_one(values["diagnostics"])
        if values["chosen_by"] is None:
            values["chosen_by"] = _earlier_rule(values)
        _check(values["chosen_by"], str, bad, "chosen_by")
        return cls(**values)


def _earlier_rule(values: dict[str, Any]) -> str:
    """The rule of a report written before `chosen_by` existed: the accuracy rule unless the
    chosen point is one of the budget points."""
    chosen = values["chosen"]
    if chosen == values["at_reference_accuracy"]:
        return keep_label(values["reference"].label, values["max_drop_points"])
    for fraction, point in values["at_budget_fraction"].items():
        if point == chosen:
            return budget_label(float(fraction))
    return "a MACs budget this report does not record"


def _teacher_exits_from_one(d: Diagnostics) -> Diagnostics:
    """An earlier report's 0-based teacher exits, numbered from 1 as reports are now."""
    per_exit = [
        x if x.teacher_exit is None else dataclasses.replace(x, teacher_exit=x.teacher_exit + 1)
        for x in d.per_exit
    ]
    return dataclasses.replace(d, per_exit=per_exit)


def read_report(path: str | Path) -> Report:
    """The `report.json` of `erde evaluate`, validated once (a clear message if it is not one)."""
    return Report.from_json(read_json(Path(path), "evaluation report"), path)


def _entries(cls: type, raw: Any, bad: Callable[[str], ErdeError], what: str) -> dict[str, Any]:
    """The dataclass's fields from a JSON object; every field without a default must be there."""
    if not isinstance(raw, dict):
        raise bad(f"{what} is not a JSON object")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise bad(f"{what} has no {', '.join(repr(k) for k in missing)} entry")
    return {f.name: raw[f.name] for f in fields if f.name in raw}


def _check(value: Any, kind: type, bad: Callable[[str], ErdeError], key: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad(f"{key!r} must be a {kind.__name__}")


def _number(value: Any, bad: Callable[[str], ErdeError], key: str) -> float:
    """A number; null is NaN (`write_json` writes NaN and infinities as null)."""
    if value is None:
        return math.nan
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(f"{key!r} must be a number")
    return float(value)


def _optional(value: Any, bad: Callable[[str], ErdeError], key: str) -> float | None:
    """A number, or None (null) where the quantity is undefined."""
    return None if value is None else _number(value, bad, key)


def _numbers(value: Any, bad: Callable[[str], ErdeError], key: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise bad(f"{key!r} must be a non-empty list of numbers")
    return [_number(v, bad, key) for v in value]


def _reference(raw: Any, bad: Callable[[str], ErdeError]) -> Reference:
    values = _entries(Reference, raw, bad, "'reference'")
    _check(values["label"], str, bad, "reference.label")
    numbers = {k: _number(v, bad, f"reference.{k}") for k, v in values.items() if k != "label"}
    return Reference(label=values["label"], **numbers)


def _point(raw: Any, bad: Callable[[str], ErdeError], key: str) -> OperatingPoint:
    values = _entries(OperatingPoint, raw, bad, repr(key))
    _check(values["criterion"], str, bad, f"{key}.criterion")
    _check(values.get("reached", True), bool, bad, f"{key}.reached")
    for name in values.keys() - {"criterion", "reached", "test_exit_share"}:
        values[name] = _number(values[name], bad, f"{key}.{name}")
    values["test_exit_share"] = _numbers(values["test_exit_share"], bad, f"{key}.test_exit_share")
    return OperatingPoint(**values)


def _exit_diagnostics(raw: Any, bad: Callable[[str], ErdeError], key: str) -> ExitDiagnostics:
    values = _entries(ExitDiagnostics, raw, bad, repr(key))
    exit_index = values["teacher_exit"]
    if exit_index is not None:
        _check(exit_index, int, bad, f"{key}.teacher_exit")
    numbers = {k: _optional(v, bad, f"{key}.{k}") for k, v in values.items() if k != "teacher_exit"}
    if numbers["ece"] is None:
        raise bad(f"'{key}.ece' must be a number")
    return ExitDiagnostics(teacher_exit=exit_index, **numbers)


def _diagnostics(raw: Any, bad: Callable[[str], ErdeError]) -> Diagnostics:
    values = _entries(Diagnostics, raw, bad, "'diagnostics'")
    _check(values["ece_bins"], int, bad, "diagnostics.ece_bins")
    _check(values["teacher_note"], str, bad, "diagnostics.teacher_note")
    for key in ("teacher_wrong_share", "early_exit_error"):
        values[key] = _optional(values[key], bad, f"diagnostics.{key}")
    values["early_exit_share"] = _number(
        values["early_exit_share"], bad, "diagnostics.early_exit_share"
    )
    per_exit = values["per_exit"]
    if not isinstance(per_exit, list) or not per_exit:
        raise bad("'diagnostics.per_exit' must be a non-empty list")
    values["per_exit"] = [
        _exit_diagnostics(e, bad, f"diagnostics.per_exit[{i}]") for i, e in enumerate(per_exit)
    ]
    return Diagnostics(**values)


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
