"""`manifest.json` of an export: the model it holds, the deployment threshold, and one entry per
ONNX file. Read and checked in one place: `read_manifest` checks the file against
`ManifestFile`, whose field types (`erde.run.formats`, shared with `model.json`) give every field's
type and range, before anything uses it (and that the graphs' stated shapes fit the images and
classes), and `read_graph` every file's place, checksum, self-containment and tensor names and
shapes. The runtime and the benchmark use the typed `Manifest`, never the raw dict.

A manifest is input like any other (a folder can be copied, edited or planted), so every file it
names must be a plain file name whose path resolves inside the export folder: no `..`, no
absolute path, no link to elsewhere, and no ONNX external-data reference (which ONNX Runtime
would follow to any path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Interval, MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainValidator,
    TypeAdapter,
    model_validator,
)
from typing_extensions import NotRequired, TypedDict

from erde.deploy.onnx_wire import graph_facts
from erde.errors import ErdeError
from erde.evaluation.rule import PolicyName
from erde.files import parse_json, read_json, sha256_bytes
from erde.run.formats import (
    VERSION_KEY,
    FieldProblem,
    Flag,
    NonNegative,
    Sha256,
    Text,
    Whole,
    check_version,
    validate,
)
from erde.run.model_info import ModelInfo, checked

FORMAT = "erde-early-exit-onnx"
FORMAT_VERSION = 3  # 3: single.onnx numbers exits 1..n (2 numbered them from 0)
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "int8")
FIX = "re-create the folder with `erde export RUN --out DIR --overwrite`"


def _plain_name(name: str) -> str:
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"names {name!r}, not a plain file name inside the export folder")
    return name


def _dimension(value: Any) -> int | str:
    """A size, or the name of a dynamic dimension, as `shapes` records them."""
    if isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ):
        return value
    raise ValueError("is neither a size nor the name of a dimension")


class Tensor(TypedDict):
    name: Text
    shape: list[Annotated[int | str, PlainValidator(_dimension)]]


class GraphFile(TypedDict):
    """A file entry: a plain file inside the export folder, its checksum and its graph's
    inputs and outputs (a piece also gives its exit)."""

    file: Annotated[Text, AfterValidator(_plain_name)]
    sha256: Sha256
    inputs: Annotated[list[Tensor], MinLen(1)]
    outputs: Annotated[list[Tensor], MinLen(1)]
    exit: NotRequired[Whole]


class ManifestFile(BaseModel):
    """`manifest.json` as written: flat keys, so a person reading the file finds each fact at
    the top level. The model's own fields are `ModelInfo`'s (`_info_fields`)."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[FORMAT]
    source_run: Text
    weights_sha256: Sha256
    model: Text
    arch: Any
    method: Any
    classes: Any
    input_size: Any
    in_channels: Any
    mean: Any
    std: Any
    data_source: Any
    exit_macs: Any
    static_macs: Any
    precision: Literal[PRECISIONS]
    threshold: NonNegative
    policy: PolicyName
    normalize: Flag
    threshold_source: Text
    budget_thresholds: dict[str, NonNegative]
    pieces: list[GraphFile]
    static: GraphFile
    single: GraphFile
    quantization: dict[str, Any] | None
    opset: Annotated[Whole, Interval(ge=1, le=100)]
    exporter: Text

    @model_validator(mode="after")
    def _distinct_files(self) -> ManifestFile:
        names = [e["file"] for e in [*self.pieces, self.static, self.single]]
        if len(set(names)) != len(names):
            raise ValueError("names one file for two graphs")
        return self


# `ModelInfo`'s fields under their names in a manifest.
_DATA_KEYS = {"source": "data_source", **{k: k for k in ("classes", "mean", "std")}}
_DATA_KEYS.update({"input_size": "input_size", "in_channels": "in_channels"})


def _info_fields(raw: dict) -> dict:
    return {
        **{k: raw.get(k) for k in ("arch", "exit_macs", "static_macs", "method")},
        "data": {k: raw.get(key) for k, key in _DATA_KEYS.items()},
    }


def _manifest_name(field: str) -> str:
    """A `ModelInfo` field as the manifest names it: `data.std[0]` is `std[0]`."""
    if not field.startswith("data."):
        return field
    key, _, rest = field.removeprefix("data.").partition("[")
    return _DATA_KEYS.get(key, key) + (f"[{rest}" if rest else "")


@dataclass(frozen=True)
class Deployment:
    """The threshold a deployment exits with, the policy it was chosen for, and where it came
    from (calibrated on val by `erde evaluate`, or given)."""

    threshold: float
    policy: str
    normalize: bool
    threshold_source: str


@dataclass(frozen=True)
class Manifest:
    info: ModelInfo
    deployment: Deployment
    pieces: list[dict]  # per exit: file, sha256, inputs, outputs (names and shapes)
    static: dict  # the plain network's file entry
    single: dict  # the batch-1 graph with an If per exit (erde.deploy.single)
    precision: str  # fp32 or int8
    budget_thresholds: dict[str, float]  # MACs fraction -> val-calibrated threshold
    quantization: dict | None  # how the int8 graphs were made; None for fp32
    opset: int
    exporter: str
    source_run: str
    weights_sha256: str

    def to_json(self) -> dict[str, Any]:
        """Flat keys, so a person reading the file finds each fact at the top level."""
        i, d = self.info, self.info.data
        return {
            "format": FORMAT,
            VERSION_KEY: FORMAT_VERSION,
            "source_run": self.source_run,
            "weights_sha256": self.weights_sha256,
            "model": i.name,
            "arch": i.arch,
            "method": i.method,
            "classes": d.classes,
            "input_size": d.input_size,
            "in_channels": d.in_channels,
            "mean": d.mean,
            "std": d.std,
            "data_source": d.source,
            "precision": self.precision,
            "threshold": self.deployment.threshold,
            "policy": self.deployment.policy,
            "normalize": self.deployment.normalize,
            "threshold_source": self.deployment.threshold_source,
            "budget_thresholds": self.budget_thresholds,
            "exit_macs": i.exit_macs,
            "static_macs": i.static_macs,
            "pieces": self.pieces,
            "static": self.static,
            "single": self.single,
            "quantization": self.quantization,
            "opset": self.opset,
            "exporter": self.exporter,
        }

    @classmethod
    def from_json(cls, raw: Any, path: Path) -> Manifest:
        """A manifest of the current format version; older ones (whose graphs this erde runs
        differently) and newer ones are refused with the re-export command."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ErdeError(f"{path} is not an erde export manifest; {FIX}")
        raw = check_version(raw, path, FORMAT_VERSION, {}, FIX)
        file = validate(_FILE, raw, path, FIX)
        info = checked(_info_fields(raw), path, FIX, _manifest_name)
        try:
            _check_files(file, info)
        except ValueError as exc:
            raise ErdeError(f"{path}: {exc}; {FIX}") from None
        return cls(
            info=info,
            deployment=Deployment(
                file.threshold, file.policy, file.normalize, file.threshold_source
            ),
            pieces=file.pieces,
            static=file.static,
            single=file.single,
            precision=file.precision,
            budget_thresholds=file.budget_thresholds,
            quantization=file.quantization,
            opset=file.opset,
            exporter=file.exporter,
            source_run=file.source_run,
            weights_sha256=file.weights_sha256,
        )


_FILE = TypeAdapter(ManifestFile)


def _check_files(file: ManifestFile, info: ModelInfo) -> None:
    """One piece per exit in order, chained by tensor name and shape, plus the static and single
    graphs, all taking the model's images and giving one logit per class."""
    n_exits = info.num_exits
    pieces = file.pieces
    if len(pieces) != n_exits:
        raise FieldProblem("pieces", f"must list one file per exit ({n_exits})")
    for k, piece in enumerate(pieces):
        if piece.get("exit") != k + 1:
            raise FieldProblem(
                "pieces", f"out of order (entry {k + 1} says exit {piece.get('exit')})"
            )
        want = 1 if k == n_exits - 1 else 3
        if len(piece["inputs"]) != 1 or len(piece["outputs"]) != want:
            raise FieldProblem(f"pieces[{k}]", f"must have 1 input and {want} output(s)")
        if k and piece["inputs"][0] != pieces[k - 1]["outputs"][0]:
            raise FieldProblem("pieces", f"does not chain piece {k} to piece {k + 1}")
    d = info.data
    images = [pieces[0]["inputs"][0], file.static["inputs"][0], file.single["inputs"][0]]
    if any(v["shape"][1:] != [d.in_channels, d.input_size, d.input_size] for v in images):
        raise ValueError(
            f"gives graph inputs that are not {d.in_channels} x {d.input_size} x {d.input_size} "
            "images ('in_channels', 'input_size')"
        )
    logits = [p["outputs"][1 if k < n_exits - 1 else 0] for k, p in enumerate(pieces)]
    logits += [file.static["outputs"][0], file.single["outputs"][0]]
    if any(v["shape"][-1:] != [len(d.classes)] for v in logits):
        raise ValueError(f"gives graph outputs of other than {len(d.classes)} logits ('classes')")


def read_manifest(export_dir: str | Path) -> Manifest:
    """The manifest of an erde export; a clear refusal for anything else."""
    path = Path(export_dir) / MANIFEST
    if not Path(export_dir).is_dir():
        raise ErdeError(f"export folder {export_dir} does not exist; create it with `erde export`")
    if not path.is_file():
        raise ErdeError(
            f"{export_dir} holds no {MANIFEST}, so it is not an erde export; create one with "
            "`erde export RUN --out DIR`"
        )
    return Manifest.from_json(read_json(path, "export manifest"), path)


def is_export(path: Path) -> bool:
    try:
        return parse_json((path / MANIFEST).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_files(path: Path) -> set[str]:
    """The names an export wrote into its folder: the manifest and every file it lists."""
    found = {MANIFEST}

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("file"), str):
                found.add(Path(value["file"]).parts[0])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(parse_json((path / MANIFEST).read_bytes()))
    return found


def read_verified(export_dir: Path, entry: dict) -> bytes:
    """A file of the export, inside the folder and matching the manifest's SHA-256 (read once,
    then used: what was checked is what runs)."""
    folder = Path(export_dir)
    path = folder / entry["file"]
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise ErdeError(
            f"{path} is a link to {path.resolve()}, outside the export folder; an export's files "
            "must lie inside it: re-create the folder with `erde export`"
        )
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ErdeError(
            f"{path} is missing from the export; re-create the folder with `erde export`"
        ) from None
    except OSError as exc:
        raise ErdeError(
            f"{path} cannot be read ({exc.strerror}); re-create the folder with `erde export`"
        ) from None
    if sha256_bytes(blob) != entry["sha256"]:
        raise ErdeError(
            f"{path} does not match the checksum in {folder / MANIFEST} (altered or "
            "corrupt); re-create the folder with `erde export`"
        )
    return blob


def read_graph(export_dir: Path, entry: dict) -> bytes:
    """A verified ONNX file that is self-contained and has the interface its entry states."""
    blob = read_verified(export_dir, entry)
    path = Path(export_dir) / entry["file"]
    try:
        facts = graph_facts(blob)
    except (ValueError, RecursionError) as exc:  # no valid protobuf, or nested absurdly
        raise ErdeError(
            f"{path} is not an ONNX model ({exc}); re-create the folder with `erde export`"
        ) from None
    if facts.external_data:
        raise ErdeError(
            f"{path} refers to external data files, which erde exports never write; "
            "re-create the folder with `erde export`"
        )
    manifest = Path(export_dir) / MANIFEST
    for key, found in (("inputs", facts.inputs), ("outputs", facts.outputs)):
        stated = entry[key]
        for what in ("name", "shape"):
            if [v[what] for v in found] != [v[what] for v in stated]:
                raise ErdeError(
                    f"{path} has {key} {_listing(found, what)}, but {manifest} says "
                    f"{_listing(stated, what)}; re-create the folder with `erde export`"
                )
    return blob


def _listing(values: list[dict], what: str) -> str:
    """Tensor names as a list, or tensors with their shapes."""
    if what == "name":
        return str([v["name"] for v in values])
    return ", ".join(f"{v['name']} ({', '.join(map(str, v['shape']))})" for v in values)
