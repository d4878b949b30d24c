"""`manifest.json` of an export: the model it holds, everything a runtime needs to feed and
decide with its graphs (the `preprocess` and `exits` blocks, the val curve a budget is chosen
from), and one entry per ONNX file. DEPLOY.md (`erde.deploy.deploy_md`) says the same in prose.
Read and checked in one place: `read_manifest` checks the file against `ManifestFile`, whose
field types (`erde.run.formats`, shared with `model.json`) give every field's type and range,
before anything uses it (and that the spec blocks agree with each other and with the graphs'
stated shapes: input size, channels, exit count, mean/std length), and `read_graph` every
file's place, checksum, self-containment and tensor names and shapes. The runtime and the
benchmark use the typed `Manifest`, never the raw dict.

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

from erde.data.decode import resized_shorter_side
from erde.deploy.onnx_wire import graph_facts
from erde.errors import ErdeError
from erde.evaluation.rule import PolicyName
from erde.files import parse_json, read_json, sha256_bytes
from erde.run.formats import (
    VERSION_KEY,
    FieldProblem,
    Finite,
    Flag,
    NonNegative,
    Sha256,
    Text,
    Whole,
    check_version,
    validate,
)
from erde.run.model_info import DataInfo, ModelInfo, checked

FORMAT = "erde-early-exit-onnx"
# 3: single.onnx numbers exits 1..n (2 numbered them from 0). 4: the `preprocess`, `exits` and
# `val_curve` blocks (`_from_version_3` moves a version-3 file's flat keys into them).
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
DEPLOY_MD = "DEPLOY.md"  # the manifest in prose (`erde.deploy.deploy_md`)
# The names `erde.deploy.single` gives the single-call graph's tensors (that module builds the
# graph with `onnx`, which a runtime-only install lacks); tests/test_runtime_light.py checks them.
THRESHOLDS, LOGITS, EXIT = "thresholds", "logits", "exit"
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
    meaning: NotRequired[Text]  # a description for people (`tensor_meaning`); never read


class GraphFile(TypedDict):
    """A file entry: a plain file inside the export folder, its checksum and its graph's
    inputs and outputs (a piece also gives its exit)."""

    file: Annotated[Text, AfterValidator(_plain_name)]
    sha256: Sha256
    inputs: Annotated[list[Tensor], MinLen(1)]
    outputs: Annotated[list[Tensor], MinLen(1)]
    exit: NotRequired[Whole]


# The fixed parts of the preprocessing and exit rule, stated in the file so that a runtime in
# any language follows it without erde (erde.data.decode is the implementation).
DECODE = (
    "Pillow: palette expanded, alpha dropped, 16-bit grey scaled to 8 bits; a grey model takes "
    "Pillow's L (ITU-R 601-2 luma) of a colour file, a colour model a grey file repeated into R, "
    "G and B"
)
LONGER_SIDE = "floor(to * longer / shorter)"
RESIZE_FILTER = "bilinear, antialiased when shrinking: Pillow Image.resize(Resampling.BILINEAR)"
CROP_OFFSET = "top = floor((height - size) / 2), left = floor((width - size) / 2)"
NORMALISE = "x[c] = (pixel[c] / 255 - mean[c]) / std[c], float32"
CHANNELS = {1: "grey", 3: "RGB"}
RULE = (
    "an image leaves at the first exit k < count whose score (output scoreK of piece K) is below "
    "the threshold (float32, strictly); the last exit always answers"
)
SCORES = {
    ("entropy", False): "entropy of p = softmax(logits) in nats, -sum_k p_k ln p_k",
    ("entropy", True): "entropy of p = softmax(logits) divided by ln(classes), 0..1",
    ("maxprob", False): "1 - max_k p_k of p = softmax(logits), summed over the other classes",
    ("maxprob", True): "1 - max_k p_k of p = softmax(logits), summed over the other classes",
}


def score_text(policy: str, normalize: bool) -> str:
    """The score formula in words: erde's own policies', or a plugin's name (its module says
    how it scores; the graph computes it)."""
    plugin = f"the plugin exit policy {policy!r} (normalize={str(normalize).lower()})"
    return SCORES.get((policy, normalize), plugin)


CURVE_NOTE = (
    "the val sweep's thresholds that are the best choice for some MACs budget, by increasing "
    "MACs: for a budget, take the last point whose expected_macs is within it"
)


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Resize(_Block):
    side: Literal["shorter"]
    to: Annotated[Whole, Interval(ge=1)]
    longer: Literal[LONGER_SIDE]
    filter: Literal[RESIZE_FILTER]


class Crop(_Block):
    where: Literal["centre"]
    size: Any  # the input size, checked against `input_size`
    fraction: Any  # `ModelInfo.data.eval_crop`
    offset: Literal[CROP_OFFSET]


class Preprocess(_Block):
    """From an image file to the graphs' input: decode, resize, crop, scale, normalise."""

    decode: Literal[DECODE]
    channels: Literal[tuple(CHANNELS.values())]
    in_channels: Any  # `ModelInfo`'s fields, checked there (`_info_fields`)
    input_size: Any
    resize: Resize
    crop: Crop
    divide_by: Literal[255]
    mean: Any
    std: Any
    normalise: Literal[NORMALISE]
    layout: Literal["NCHW"]
    dtype: Literal["float32"]


class Exits(_Block):
    """How many exits, what they cost, how their score is computed and when an image leaves."""

    count: Annotated[Whole, Interval(ge=1)]
    numbering: Literal["1-based"]
    macs: Any  # cumulative per image, `ModelInfo.exit_macs`
    static_macs: Any
    policy: PolicyName
    normalize: Flag
    score: Text
    rule: Literal[RULE]
    threshold: NonNegative

    @model_validator(mode="after")
    def _score_of_policy(self) -> Exits:
        if self.score != score_text(self.policy, self.normalize):
            raise FieldProblem(
                "score", f"does not describe policy {self.policy!r} (normalize={self.normalize})"
            )
        return self


class CurvePoint(TypedDict):
    threshold: NonNegative
    val_accuracy: Annotated[Finite, Interval(ge=0, le=1)]
    expected_macs: Annotated[Finite, Interval(gt=0)]
    exit_share: list[Annotated[Finite, Interval(ge=0, le=1)]]


class ValCurve(TypedDict):
    """Threshold -> val accuracy and expected MACs, on the accuracy/MACs frontier."""

    images: Annotated[Whole, Interval(ge=1)]
    note: Literal[CURVE_NOTE]
    points: Annotated[list[CurvePoint], MinLen(1)]


class ManifestFile(BaseModel):
    """`manifest.json` as written: what the model is at the top level, how to feed it in
    `preprocess`, how it decides in `exits`. The model's own fields are `ModelInfo`'s
    (`_info_fields`)."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[FORMAT]
    source_run: Text
    weights_sha256: Sha256
    model: Text
    arch: Any
    method: Any
    classes: Any
    data_source: Any
    preprocess: Preprocess
    exits: Exits
    precision: Literal[PRECISIONS]
    threshold_source: Text
    budget_thresholds: dict[str, NonNegative]
    val_curve: ValCurve | None
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
_NAMES = {
    "data.source": "data_source",
    "data.classes": "classes",
    "data.mean": "preprocess.mean",
    "data.std": "preprocess.std",
    "data.input_size": "preprocess.input_size",
    "data.in_channels": "preprocess.in_channels",
    "data.eval_crop": "preprocess.crop.fraction",
    "exit_macs": "exits.macs",
    "static_macs": "exits.static_macs",
}


def _info_fields(file: ManifestFile) -> dict:
    p = file.preprocess
    return {
        "arch": file.arch,
        "method": file.method,
        "exit_macs": file.exits.macs,
        "static_macs": file.exits.static_macs,
        "data": {
            "source": file.data_source,
            "classes": file.classes,
            "mean": p.mean,
            "std": p.std,
            "input_size": p.input_size,
            "in_channels": p.in_channels,
            "eval_crop": p.crop.fraction,
        },
    }


def _manifest_name(field: str) -> str:
    """A `ModelInfo` field as the manifest names it: `data.std[0]` is `preprocess.std[0]`."""
    key, bracket, rest = field.partition("[")
    return _NAMES.get(key, key) + (f"[{rest}" if bracket else "")


def tensor_meaning(name: str, count: int) -> str:
    """What a graph's input or output holds, by the names `erde export` gives them."""
    if name == "image":
        return "the preprocessed images (see preprocess)"
    if name == THRESHOLDS:
        return f"float32, one threshold per deciding exit (exits 1..{count - 1})"
    if name == LOGITS:  # single.onnx's; static.onnx's are `_described`'s
        return "class logits of the exit that answered"
    if name == EXIT:
        return f"int64, the exit that answered (1..{count})"
    for prefix, what in (
        ("features", "features for piece {k1}, the next piece's input"),
        ("logits", "class logits of exit {k}"),
        ("score", "exit score of exit {k} (exits.score; lower is surer)"),
    ):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            k = int(name[len(prefix) :])
            return what.format(k=k, k1=k + 1)
    return name


def _from_version_3(raw: dict) -> dict:
    """Version 3 held the same facts as flat keys: they move into `preprocess` and `exits`,
    with the rule its runtime did not know, the crop of every run without `data.eval_crop`
    (fraction 1: the shorter side resized to the input size, the centre cut out), and no val
    curve (re-export for one)."""
    flat = ("mean", "std", "input_size", "in_channels", "threshold", "policy", "normalize")
    raw = dict(raw)
    got = {k: raw.pop(k) for k in (*flat, "exit_macs", "static_macs") if k in raw}
    size, policy, normalize = got.get("input_size"), got.get("policy"), got.get("normalize")
    channels = got.get("in_channels")
    preprocess = {
        "decode": DECODE,
        "channels": CHANNELS.get(channels) if isinstance(channels, int) else None,
        "resize": {"side": "shorter", "to": size, "longer": LONGER_SIDE, "filter": RESIZE_FILTER},
        "crop": {"where": "centre", "size": size, "fraction": 1.0, "offset": CROP_OFFSET},
        "divide_by": 255,
        "normalise": NORMALISE,
        "layout": "NCHW",
        "dtype": "float32",
    }
    preprocess.update({k: got[k] for k in ("in_channels", "input_size", "mean", "std") if k in got})
    exits = {"numbering": "1-based", "rule": RULE}
    macs = got.get("exit_macs")
    if isinstance(macs, list):
        exits["count"] = len(macs)
    exits.update({k: got[k] for k in ("policy", "normalize", "threshold") if k in got})
    exits.update({k.replace("exit_", ""): got[k] for k in ("exit_macs", "static_macs") if k in got})
    if isinstance(policy, str) and isinstance(normalize, bool):
        exits["score"] = score_text(policy, normalize)
    return {**raw, "preprocess": preprocess, "exits": exits, "val_curve": None}


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
    # `ValCurve`: the val frontier a budget is chosen from (None: no evaluation to take it from)
    val_curve: dict | None = None

    def to_json(self) -> dict[str, Any]:
        """What the model is at the top level, how to feed it (`preprocess`) and how it decides
        (`exits`), then the curve and the files."""
        i, d, point = self.info, self.info.data, self.deployment
        n = i.num_exits
        return {
            "format": FORMAT,
            VERSION_KEY: FORMAT_VERSION,
            "source_run": self.source_run,
            "weights_sha256": self.weights_sha256,
            "model": i.name,
            "arch": i.arch,
            "method": i.method,
            "classes": d.classes,
            "data_source": d.source,
            "precision": self.precision,
            "preprocess": {
                "decode": DECODE,
                "channels": CHANNELS[d.in_channels],
                "in_channels": d.in_channels,
                "input_size": d.input_size,
                "resize": {
                    "side": "shorter",
                    "to": resized_shorter_side(d.input_size, d.eval_crop),
                    "longer": LONGER_SIDE,
                    "filter": RESIZE_FILTER,
                },
                "crop": {
                    "where": "centre",
                    "size": d.input_size,
                    "fraction": d.eval_crop,
                    "offset": CROP_OFFSET,
                },
                "divide_by": 255,
                "mean": d.mean,
                "std": d.std,
                "normalise": NORMALISE,
                "layout": "NCHW",
                "dtype": "float32",
            },
            "exits": {
                "count": n,
                "numbering": "1-based",
                "macs": i.exit_macs,
                "static_macs": i.static_macs,
                "policy": point.policy,
                "normalize": point.normalize,
                "score": score_text(point.policy, point.normalize),
                "rule": RULE,
                "threshold": point.threshold,
            },
            "threshold_source": point.threshold_source,
            "budget_thresholds": self.budget_thresholds,
            "val_curve": self.val_curve,
            "pieces": [_described(p, n) for p in self.pieces],
            "static": _described(self.static, n, "class logits of the plain network"),
            "single": _described(self.single, n),
            "quantization": self.quantization,
            "opset": self.opset,
            "exporter": self.exporter,
        }

    @classmethod
    def from_json(cls, raw: Any, path: Path) -> Manifest:
        """A manifest of the current format version, or of version 3 (`_from_version_3`); older
        ones (whose graphs this erde runs differently) and newer ones are refused with the
        re-export command."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ErdeError(f"{path} is not an erde export manifest; {FIX}")
        raw = check_version(raw, path, FORMAT_VERSION, {3: _from_version_3}, FIX)
        file = validate(_FILE, raw, path, FIX)
        info = checked(_info_fields(file), path, FIX, _manifest_name)
        try:
            _check_files(file, info)
        except ValueError as exc:
            raise ErdeError(f"{path}: {exc}; {FIX}") from None
        e = file.exits
        return cls(
            info=info,
            deployment=Deployment(e.threshold, e.policy, e.normalize, file.threshold_source),
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
            val_curve=file.val_curve,
        )


def _described(entry: dict, count: int, output: str | None = None) -> dict:
    """A file entry with every tensor's meaning (`tensor_meaning`, or `output` for outputs)."""

    def tensors(key: str) -> list[dict]:
        return [
            {
                **t,
                "meaning": output
                if output and key == "outputs"
                else tensor_meaning(t["name"], count),
            }
            for t in entry[key]
        ]

    return {**entry, "inputs": tensors("inputs"), "outputs": tensors("outputs")}


_FILE = TypeAdapter(ManifestFile)


def _check_files(file: ManifestFile, info: ModelInfo) -> None:
    """The spec blocks against each other and the graphs: one piece per exit in order, chained by
    tensor name and shape, plus the static and single graphs, all taking the model's images and
    giving one logit per class; the resize and crop the input size's; a val curve of this
    model's exits."""
    n_exits = info.num_exits
    pieces = file.pieces
    if file.exits.count != n_exits:
        raise FieldProblem("exits.count", f"is {file.exits.count} but 'exits.macs' lists {n_exits}")
    if len(pieces) != n_exits:
        raise FieldProblem("pieces", f"must list one file per exit ({n_exits}, 'exits.count')")
    for k, piece in enumerate(pieces):
        if piece.get("exit") != k + 1:
            raise FieldProblem(
                "pieces", f"out of order (entry {k + 1} says exit {piece.get('exit')})"
            )
        want = 1 if k == n_exits - 1 else 3
        if len(piece["inputs"]) != 1 or len(piece["outputs"]) != want:
            raise FieldProblem(f"pieces[{k}]", f"must have 1 input and {want} output(s)")
        if k and any(
            piece["inputs"][0][key] != pieces[k - 1]["outputs"][0][key] for key in ("name", "shape")
        ):
            raise FieldProblem("pieces", f"does not chain piece {k} to piece {k + 1}")
    d = info.data
    images = [pieces[0]["inputs"][0], file.static["inputs"][0], file.single["inputs"][0]]
    if any(v["shape"][1:] != [d.in_channels, d.input_size, d.input_size] for v in images):
        raise ValueError(
            f"gives graph inputs that are not {d.in_channels} x {d.input_size} x {d.input_size} "
            "images ('preprocess.in_channels', 'preprocess.input_size')"
        )
    cuts = [v for v in file.single["inputs"] if v["name"] == THRESHOLDS]
    if cuts and cuts[0]["shape"] != [n_exits - 1]:
        raise ValueError(
            f"gives single.onnx a 'thresholds' input of shape {cuts[0]['shape']}, not "
            f"[{n_exits - 1}] (one per deciding exit of 'exits.count' {n_exits})"
        )
    logits = [p["outputs"][1 if k < n_exits - 1 else 0] for k, p in enumerate(pieces)]
    logits += [file.static["outputs"][0], file.single["outputs"][0]]
    if any(v["shape"][-1:] != [len(d.classes)] for v in logits):
        raise ValueError(f"gives graph outputs of other than {len(d.classes)} logits ('classes')")
    _check_preprocess(file.preprocess, d)
    if file.val_curve is not None:
        _check_curve(file.val_curve, info)


def _check_preprocess(p: Preprocess, d: DataInfo) -> None:
    if p.channels != CHANNELS.get(d.in_channels):
        raise FieldProblem(
            "preprocess.channels", f"is {p.channels!r} but 'in_channels' is {d.in_channels}"
        )
    if p.crop.size != d.input_size:
        raise FieldProblem(
            "preprocess.crop.size", f"is {p.crop.size!r} but 'input_size' is {d.input_size}"
        )
    want = resized_shorter_side(d.input_size, d.eval_crop)
    if p.resize.to != want:
        raise FieldProblem(
            "preprocess.resize.to",
            f"is {p.resize.to} but 'input_size' {d.input_size} / 'crop.fraction' "
            f"{d.eval_crop:g} gives {want}",
        )


def _check_curve(curve: dict, info: ModelInfo) -> None:
    low, high = info.exit_macs[0], info.exit_macs[-1]
    for k, point in enumerate(curve["points"]):
        if len(point["exit_share"]) != info.num_exits:
            raise FieldProblem(
                f"val_curve.points[{k}].exit_share",
                f"must hold one share per exit ({info.num_exits})",
            )
        if not low * (1 - 1e-9) <= point["expected_macs"] <= high * (1 + 1e-9):
            raise FieldProblem(
                f"val_curve.points[{k}].expected_macs",
                f"lies outside the first to the last exit's MACs ({low} to {high})",
            )


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
    """The names an export wrote into its folder: the manifest, DEPLOY.md and every file the
    manifest lists."""
    found = {MANIFEST, DEPLOY_MD}

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
