"""`model.json`, the sidecar of a run's weights: how to rebuild the model, what it costs and
what data it expects. Its format is the dataclasses below, whose field types
(`erde.run.formats`) carry the rules; `ModelInfo.read` checks a file once, and every command
uses the typed object, never the raw dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, TypeAdapter, with_config
from typing_extensions import NotRequired, TypedDict

from erde.files import read_json, write_json
from erde.run.formats import (
    VERSION_KEY,
    Classes,
    Count,
    CropFraction,
    ExitMacs,
    FieldProblem,
    Flag,
    PixelMean,
    PixelStd,
    Text,
    Whole,
    check_version,
    validate,
)

# 2: the file names its format version (version 1, which did not, is read the same way).
# 3: data.eval_crop records the crop rule (`_from_version_2` takes it from the config).
FORMAT_VERSION = 3
FIX = "retrain the run (`erde train ... --overwrite`) or restore the file"


@with_config(ConfigDict(extra="allow"))
class Arch(TypedDict):
    """The keyword arguments of `create_model`: the sizes it allocates are checked, any other
    option is the builder's to check."""

    name: Text
    num_classes: NotRequired[Count]
    in_channels: NotRequired[Count]
    input_size: NotRequired[Count]
    exits: NotRequired[list[Count]]


@dataclass(frozen=True)
class DataInfo:
    """What a model expects of its input: the data it was trained on and its normalisation."""

    source: Text
    classes: Classes
    mean: list[PixelMean]
    std: list[PixelStd]
    input_size: Count
    in_channels: Count
    # Evaluation's centre crop (`data.eval_crop`): images are brought to input_size by resizing
    # the shorter side to round(input_size / eval_crop) and cropping the centre
    # (`erde.data.decode.resize_crop`), in evaluation, `erde infer` and `predict_files` alike.
    eval_crop: CropFraction = 1.0

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

    arch: Arch
    exit_macs: ExitMacs
    static_macs: Count
    data: DataInfo
    method: Text = "teacher"
    seed: Whole = 0
    epochs: Whole = 0
    teacher: Text | None = None
    pairing: list[Whole] | None = None
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    epoch: Whole = 0
    finished: Flag = False
    # `train.precision` as the run resolved it (`auto` is bf16 on one machine, fp32 on another);
    # None in runs from before it was recorded.
    precision: Text | None = None
    # The pretrained weights the run started from ("torchvision/NAME WEIGHTS", "timm/NAME.TAG",
    # "file PATH"); None: trained from scratch, or a run from before it was recorded.
    weights: Text | None = None

    @property
    def name(self) -> str:
        return str(self.arch["name"])

    @property
    def num_exits(self) -> int:
        return len(self.exit_macs)

    def to_json(self) -> dict[str, Any]:
        return {VERSION_KEY: FORMAT_VERSION, **asdict(self)}

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        return cls.from_json(read_json(path, "model sidecar"), path)

    @classmethod
    def from_json(cls, raw: Any, path: Path | str = "model.json") -> ModelInfo:
        """A `model.json` of any version this erde reads; a damaged or foreign one is a
        one-line message naming the field, not a traceback."""
        return checked(check_version(raw, path, FORMAT_VERSION, MIGRATIONS, FIX), path, FIX)


def _agree(info: ModelInfo) -> ModelInfo:
    """The sizes `create_model(**arch)` will allocate and the normalisation, against the data
    they must agree with."""
    d = info.data
    for key in ("mean", "std"):
        if len(getattr(d, key)) != d.in_channels:
            raise FieldProblem(f"data.{key}", f"must list one number per channel ({d.in_channels})")
    for key, expected, what in (
        ("num_classes", len(d.classes), "classes"),
        ("in_channels", d.in_channels, "channels"),
    ):
        if key in info.arch and info.arch[key] != expected:
            raise FieldProblem(
                f"arch.{key}", f"is {info.arch[key]!r} but the data has {expected} {what}"
            )
    return info


_ADAPTER = TypeAdapter(Annotated[ModelInfo, AfterValidator(_agree)])


def checked(raw: Any, path: Path | str, fix: str, rename=None) -> ModelInfo:
    """A current-version sidecar's fields as a `ModelInfo` (an export's manifest holds them too,
    under its own names: `rename` maps a field to the name the message gives)."""
    return validate(_ADAPTER, raw, path, fix, rename)


def _from_version_1(raw: dict) -> dict:
    """Version 1 held the same fields without naming its version."""
    return raw


def _from_version_2(raw: dict) -> dict:
    """Version 2 did not record the crop rule: the run's `data.eval_crop` (1, no crop, before
    the key existed), which its evaluation used."""
    config, data = raw.get("config"), raw.get("data")
    if not isinstance(data, dict) or "eval_crop" in data:
        return raw
    recorded = config.get("data", {}) if isinstance(config, dict) else {}
    crop = recorded.get("eval_crop", 1.0) if isinstance(recorded, dict) else 1.0
    return {**raw, "data": {**data, "eval_crop": crop}}


MIGRATIONS = {1: _from_version_1, 2: _from_version_2}
