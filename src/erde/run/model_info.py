"""`model.json`, the sidecar of a run's weights: how to rebuild the model, what it costs and
what data it expects. Read and checked in one place (`ModelInfo.read`); every command uses the
typed object, never the raw dict.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from erde.errors import ErdeError
from erde.files import read_json, write_json


@dataclass(frozen=True)
class DataInfo:
    """What a model expects of its input: the data it was trained on and its normalisation."""

    source: str
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    in_channels: int

    # What a teacher and its student must share (a teacher of other classes or image sizes
    # cannot teach).
    SHARED = ("source", "classes", "input_size", "in_channels")

    def mismatch(self, other: DataInfo) -> str | None:
        """The first key of `SHARED` on which two models' data differ, or None."""
        return next((k for k in self.SHARED if getattr(self, k) != getattr(other, k)), None)


@dataclass(frozen=True)
class ModelInfo:
    """The sidecar of a run's weights (`model.json`).

    `exit_macs` are the cumulative MACs per image of exits 1..n (every head on the way counted);
    `static_macs` are those of the plain network (all segments plus the final head only), the cost
    of deploying it without early exits.
    """

    arch: dict[str, Any]
    exit_macs: list[int]
    static_macs: int
    data: DataInfo
    method: str = "teacher"
    seed: int = 0
    epochs: int = 0
    teacher: str | None = None
    pairing: list[int] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    finished: bool = False

    @property
    def name(self) -> str:
        return str(self.arch["name"])

    @property
    def num_exits(self) -> int:
        return len(self.exit_macs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        return cls.from_json(read_json(path, "model sidecar"), path)

    @classmethod
    def from_json(cls, raw: Any, path: Path | str = "model.json") -> ModelInfo:
        """Checked field by field: a damaged or foreign sidecar is a message, not a traceback."""

        def bad(what: str) -> ErdeError:
            return ErdeError(
                f"{path}: {what}; the file was not written by this version of erde or is "
                "damaged: retrain the run or restore the file"
            )

        if not isinstance(raw, dict):
            raise bad("it does not hold a JSON object")
        missing = [k for k in ("arch", "exit_macs", "static_macs", "data") if k not in raw]
        if missing:
            raise bad(f"it has no {', '.join(repr(k) for k in missing)} entry")
        arch = raw["arch"]
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
            raise bad("'arch' must be an object with a model 'name'")
        macs = raw["exit_macs"]
        if not (isinstance(macs, list) and macs and all(_count(m) for m in macs)):
            raise bad("'exit_macs' must be a non-empty list of positive whole numbers")
        if any(b < a for a, b in itertools.pairwise(macs)):
            raise bad("'exit_macs' must not decrease (they are cumulative)")
        if not _count(raw["static_macs"]):
            raise bad("'static_macs' must be a positive whole number")
        data = _data_info(raw["data"], bad)
        known = {f for f in cls.__dataclass_fields__ if f not in ("arch", "data")}
        extra = {k: raw[k] for k in known if k in raw}
        kinds = {"method": str, "seed": int, "epochs": int, "epoch": int, "finished": bool}
        kinds.update({"teacher": (str, type(None)), "pairing": (list, type(None)), "config": dict})
        for key, kind in kinds.items():
            value = extra.get(key)
            wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
            if key in extra and wrong:
                raise bad(f"{key!r} has the wrong type ({type(value).__name__})")
        _check_arch(arch, data, bad)
        return cls(arch=arch, data=data, **extra)


def _check_arch(arch: dict[str, Any], data: DataInfo, bad) -> None:
    """The sizes `create_model(**arch)` will allocate, against the data they must agree with."""
    for key, expected in (("num_classes", len(data.classes)), ("in_channels", data.in_channels)):
        if key in arch and arch[key] != expected:
            raise bad(f"'arch.{key}' is {arch[key]!r} but 'data' implies {expected}")
    if "input_size" in arch and not _count(arch["input_size"]):
        raise bad("'arch.input_size' must be a positive whole number")
    exits = arch.get("exits", [])
    if not (isinstance(exits, list) and all(_count(e) for e in exits)):
        raise bad("'arch.exits' must be a list of block numbers")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _data_info(raw: Any, bad) -> DataInfo:
    if not isinstance(raw, dict):
        raise bad("'data' must be an object")
    missing = [k for k in DataInfo.__dataclass_fields__ if k not in raw]
    if missing:
        raise bad(f"'data' has no {', '.join(repr(k) for k in missing)} entry")
    classes, mean, std = raw["classes"], raw["mean"], raw["std"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("'data.classes' must be a non-empty list of class names")
    if not (_count(raw["input_size"]) and _count(raw["in_channels"])):
        raise bad("'data.input_size' and 'data.in_channels' must be positive whole numbers")
    for key, values in (("mean", mean), ("std", std)):
        ok = isinstance(values, list) and len(values) == raw["in_channels"]
        if not ok or not all(_finite(v) for v in values):
            raise bad(f"'data.{key}' must list one finite number per channel")
    if not all(v > 0 for v in std):
        raise bad("'data.std' must be positive")
    return DataInfo(
        source=str(raw["source"]),
        classes=list(classes),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        input_size=raw["input_size"],
        in_channels=raw["in_channels"],
    )


def _finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False
