"""`manifest.json` of an export: the model it holds, the deployment threshold, and one entry per
ONNX file. Read and checked in one place: `read_manifest` checks every field's type and range
before anything uses it (and that the graphs' stated shapes fit the images and classes), and
`read_graph` every file's place, checksum, self-containment and tensor names and shapes. The
runtime and the benchmark use the typed `Manifest`, never the raw dict.

A manifest is input like any other (a folder can be copied, edited or planted), so every file it
names must be a plain file name whose path resolves inside the export folder: no `..`, no
absolute path, no link to elsewhere, and no ONNX external-data reference (which ONNX Runtime
would follow to any path).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erde.deploy.onnx_wire import graph_facts
from erde.errors import ErdeError
from erde.evaluation.rule import POLICIES
from erde.files import read_json, sha256_bytes
from erde.run.model_info import ModelInfo

FORMAT = "erde-early-exit-onnx"
FORMAT_VERSION = 3  # 3: single.onnx numbers exits 1..n (2 numbered them from 0)
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "int8")
# The smallest pixel std (0..1 scale) a manifest may give. A channel that is not constant has a
# std of at least about 1 / (255 sqrt(N)) over N pixels (a constant one is recorded as 1), so
# only a training set of over 10^13 pixels could come below it.
_MIN_STD = 1e-6


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
            "format_version": FORMAT_VERSION,
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
        def bad(what: str) -> ErdeError:
            return ErdeError(
                f"{path} {what} (edited or damaged); re-create the folder with `erde export`"
            )

        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ErdeError(f"{path} is not an erde export manifest; re-export with `erde export`")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ErdeError(
                f"{path} has format version {raw.get('format_version')}, this erde reads "
                f"version {FORMAT_VERSION}; re-export the run with this erde version"
            )
        missing = [k for k in _KEYS if k not in raw]
        if missing:
            raise bad(f"lacks {', '.join(missing)}")
        _check_fields(raw, bad)
        info = ModelInfo.from_json(
            {
                **{k: raw[k] for k in ("arch", "exit_macs", "static_macs", "method")},
                "data": {
                    "source": raw["data_source"],
                    **{k: raw[k] for k in ("classes", "mean", "std", "input_size")},
                    "in_channels": raw["in_channels"],
                },
            },
            path,
        )
        _check_files(raw, info, bad)
        return cls(
            info=info,
            deployment=Deployment(
                float(raw["threshold"]), raw["policy"], raw["normalize"], raw["threshold_source"]
            ),
            pieces=raw["pieces"],
            static=raw["static"],
            single=raw["single"],
            precision=raw["precision"],
            budget_thresholds={k: float(v) for k, v in raw["budget_thresholds"].items()},
            quantization=raw["quantization"],
            opset=raw["opset"],
            exporter=raw["exporter"],
            source_run=raw["source_run"],
            weights_sha256=raw["weights_sha256"],
        )


_KEYS = (
    "source_run",
    "weights_sha256",
    "model",
    "arch",
    "classes",
    "input_size",
    "in_channels",
    "mean",
    "std",
    "data_source",
    "precision",
    "threshold",
    "policy",
    "normalize",
    "threshold_source",
    "budget_thresholds",
    "exit_macs",
    "static_macs",
    "pieces",
    "static",
    "single",
    "quantization",
    "opset",
    "exporter",
)


def _number(value: Any) -> bool:
    """A finite, non-negative JSON number (a bool is not one; nor is an integer too large for a
    float, which JSON allows)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:
        return False


def _check_fields(raw: dict, bad) -> None:
    """Every scalar field: type and range, before anything reads it. The normalisation must be
    pixel statistics on the 0..1 scale (what `erde train` records): a mean of 1e30 or a std of
    1e-300 would feed the graphs infinities, and their answers would be noise."""
    if not _number(raw["threshold"]):
        raise bad("has a 'threshold' that is not a finite non-negative number")
    if raw["policy"] not in POLICIES or not isinstance(raw["normalize"], bool):
        raise bad(f"needs a 'policy' out of {', '.join(POLICIES)} and 'normalize' true or false")
    if raw["precision"] not in PRECISIONS:
        raise bad(f"has precision {raw['precision']!r}, not one of {', '.join(PRECISIONS)}")
    budgets = raw["budget_thresholds"]
    if not isinstance(budgets, dict) or not all(_number(v) for v in budgets.values()):
        raise bad("has 'budget_thresholds' that do not map budgets to non-negative numbers")
    if raw["quantization"] is not None and not isinstance(raw["quantization"], dict):
        raise bad("has a 'quantization' entry that is neither null nor an object")
    opset = raw["opset"]
    if not isinstance(opset, int) or isinstance(opset, bool) or not 1 <= opset <= 100:
        raise bad("has an 'opset' that is not an ONNX opset number")
    for key in ("threshold_source", "exporter", "source_run", "weights_sha256"):
        if not isinstance(raw[key], str):
            raise bad(f"has {key!r} that is not text")
    mean, std = raw["mean"], raw["std"]
    if not isinstance(mean, list) or not all(_number(v) and v <= 1 for v in mean):
        raise bad("has a 'mean' that is not a list of pixel means between 0 and 1")
    if not isinstance(std, list) or not all(_number(v) and _MIN_STD <= v <= 1 for v in std):
        raise bad(f"has a 'std' that is not a list of pixel deviations between {_MIN_STD} and 1")


def _check_files(raw: dict, info: ModelInfo, bad) -> None:
    """One piece per exit in order, chained by tensor name and shape, plus the static and single
    graphs, all taking the model's images and giving one logit per class."""
    n_exits = info.num_exits
    pieces = raw["pieces"]
    if not isinstance(pieces, list) or len(pieces) != n_exits:
        raise bad(f"must list one file in 'pieces' per exit ({n_exits})")
    entries = [*pieces, raw["static"], raw["single"]]
    for entry in entries:
        _check_entry(entry, bad)
    names = [e["file"] for e in entries]
    if len(set(names)) != len(names):
        raise bad("names one file for two graphs")
    for k, piece in enumerate(pieces):
        if piece.get("exit") != k + 1:
            raise bad(
                f"lists the pieces out of order (entry {k + 1} says exit {piece.get('exit')})"
            )
        want = 1 if k == n_exits - 1 else 3
        if len(piece["inputs"]) != 1 or len(piece["outputs"]) != want:
            raise bad(f"gives piece {k + 1} other than 1 input and {want} output(s)")
        if k and piece["inputs"][0] != pieces[k - 1]["outputs"][0]:
            raise bad(f"does not chain piece {k} to piece {k + 1}")
    d = info.data
    twice = [c for c, n in Counter(d.classes).items() if n > 1]
    if twice:
        raise bad(f"names class {twice[0]!r} twice in 'classes'")
    images = [pieces[0]["inputs"][0], raw["static"]["inputs"][0], raw["single"]["inputs"][0]]
    if any(v["shape"][1:] != [d.in_channels, d.input_size, d.input_size] for v in images):
        raise bad(
            f"gives graph inputs that are not {d.in_channels} x {d.input_size} x {d.input_size} "
            "images ('in_channels', 'input_size')"
        )
    logits = [p["outputs"][1 if k < n_exits - 1 else 0] for k, p in enumerate(pieces)]
    logits += [raw["static"]["outputs"][0], raw["single"]["outputs"][0]]
    if any(v["shape"][-1:] != [len(d.classes)] for v in logits):
        raise bad(f"gives graph outputs of other than {len(d.classes)} logits ('classes')")


def _check_entry(entry: Any, bad) -> None:
    """A file entry names a plain file inside the export folder, with its checksum and its
    graph's inputs and outputs."""
    if not isinstance(entry, dict):
        raise bad("has a file entry that is not an object")
    name, digest = entry.get("file"), entry.get("sha256")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise bad(f"names {name!r}, not a plain file name inside the export folder")
    if not isinstance(digest, str) or len(digest) != 64:
        raise bad(f"gives no SHA-256 for {name!r}")
    for key in ("inputs", "outputs"):
        values = entry.get(key)
        ok = isinstance(values, list) and values
        if not ok or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) for v in values
        ):
            raise bad(f"gives no tensor names ({key!r}) for {name!r}")
        if not all(_shape(v.get("shape")) for v in values):
            raise bad(f"gives a tensor shape in {key!r} of {name!r} that is no list of sizes")


def _shape(value: Any) -> bool:
    """A tensor shape as `shapes` records it: sizes, or names of dynamic dimensions."""
    return isinstance(value, list) and all(
        isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
        for d in value
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
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
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

    walk(json.loads((path / MANIFEST).read_text(encoding="utf-8")))
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
