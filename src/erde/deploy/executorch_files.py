"""An ExecuTorch export's folder: `early_exit.pte` and `executorch.json`, which says what the
program is (the model's classes, input size and normalisation, its inputs and outputs), how it
decides (policy, threshold) and the program's SHA-256, so a damaged or swapped file is refused
before ExecuTorch loads it. Read and checked here, as `erde.deploy.manifest` does for ONNX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import MinLen
from pydantic import BaseModel, ConfigDict, TypeAdapter

from erde.deploy.manifest import Deployment
from erde.errors import ErdeError
from erde.evaluation.rule import PolicyName
from erde.files import parse_json, read_json, sha256_bytes
from erde.run.formats import (
    VERSION_KEY,
    Flag,
    NonNegative,
    Sha256,
    Text,
    Whole,
    check_version,
    validate,
)
from erde.run.model_info import ModelInfo, checked

FORMAT = "erde-early-exit-executorch"
FORMAT_VERSION = 1
PTE, SPEC = "early_exit.pte", "executorch.json"
FIX = "re-create the folder with `erde export RUN --out DIR --format executorch`"


class Delegation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exit: Whole
    delegated_ops: Whole
    portable_ops: Whole


class SpecFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal[FORMAT]
    source_run: Text
    weights_sha256: Sha256
    model: dict[str, Any]
    threshold: NonNegative
    policy: PolicyName
    normalize: Flag
    threshold_source: Text
    file: Literal[PTE]
    sha256: Sha256
    inputs: dict[str, list[Whole]]
    outputs: dict[str, list[Whole]]
    xnnpack: Annotated[list[Delegation], MinLen(1)]
    exporter: Text


_ADAPTER = TypeAdapter(SpecFile)


@dataclass(frozen=True)
class ExecuTorchExport:
    info: ModelInfo
    deployment: Deployment
    sha256: str
    xnnpack: list[Delegation]
    exporter: str
    weights_sha256: str


def interface(info: ModelInfo) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The program's inputs and outputs, names and shapes, in call order."""
    d = info.data
    inputs = {"image": [1, d.in_channels, d.input_size, d.input_size]}
    inputs["thresholds"] = [info.num_exits - 1]
    return inputs, {"logits": [1, len(d.classes)], "exit": [1]}


def spec_json(
    info: ModelInfo,
    point: Deployment,
    sha256: str,
    xnnpack: list[dict],
    *,
    exporter: str,
    source_run: str,
    weights_sha256: str,
) -> dict[str, Any]:
    inputs, outputs = interface(info)
    return {
        "format": FORMAT,
        VERSION_KEY: FORMAT_VERSION,
        "source_run": source_run,
        "weights_sha256": weights_sha256,
        "model": dataclasses.asdict(info),
        **dataclasses.asdict(point),
        "exit_rule": "leave at the first exit whose score < thresholds[exit - 1]; the last "
        "exit always answers; exits numbered 1..n",
        "file": PTE,
        "sha256": sha256,
        "inputs": inputs,
        "outputs": outputs,
        "xnnpack": xnnpack,
        "exporter": exporter,
    }


def read_spec(export_dir: str | Path) -> ExecuTorchExport:
    """The folder's `executorch.json`, checked; a clear refusal for anything else."""
    folder = Path(export_dir)
    path = folder / SPEC
    if not folder.is_dir():
        raise ErdeError(f"export folder {folder} does not exist; {FIX}")
    if not path.is_file():
        raise ErdeError(f"{folder} holds no {SPEC}, so it is no ExecuTorch export; {FIX}")
    raw = read_json(path, "ExecuTorch export spec")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ErdeError(f"{path} is not an erde ExecuTorch export spec; {FIX}")
    spec = validate(_ADAPTER, check_version(raw, path, FORMAT_VERSION, {}, FIX), path, FIX)
    info = checked(spec.model, path, FIX, lambda field: f"model.{field}")
    if (spec.inputs, spec.outputs) != interface(info):
        raise ErdeError(f"{path}: inputs/outputs do not fit its model's images and classes; {FIX}")
    point = Deployment(spec.threshold, spec.policy, spec.normalize, spec.threshold_source)
    return ExecuTorchExport(
        info, point, spec.sha256, spec.xnnpack, spec.exporter, spec.weights_sha256
    )


def read_program(export_dir: str | Path, spec: ExecuTorchExport) -> bytes:
    """The `.pte` bytes, matching the spec's SHA-256 (read once: what was checked is what runs)."""
    path = Path(export_dir) / PTE
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ErdeError(f"{path} cannot be read ({exc.strerror}); {FIX}") from None
    if sha256_bytes(blob) != spec.sha256:
        raise ErdeError(
            f"{path} does not match the checksum in {Path(export_dir) / SPEC} (damaged, or the "
            f"program of another export); {FIX}"
        )
    return blob


def check_destination(out_dir: Path, run: Path) -> None:
    """The folder an export writes: new, empty or an earlier ExecuTorch export (its two files
    are replaced), never the run, a folder inside it or one above it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ErdeError(f"--out {out_dir} is a file; give a folder path")
    source, out = run.resolve(), out_dir.resolve()
    if out == source or out in source.parents or source in out.parents:
        raise ErdeError(
            f"--out {out_dir} is the run {run}, inside it or above it; choose a folder outside "
            "the run"
        )
    if not out_dir.is_dir():
        return
    others = sorted({p.name for p in out_dir.iterdir()} - {PTE, SPEC})
    if others or ((out_dir / SPEC).is_file() and not _is_spec(out_dir / SPEC)):
        raise ErdeError(
            f"{out_dir} holds files an ExecuTorch export did not write "
            f"({', '.join(others) or SPEC}); choose a new or empty --out folder"
        )


def is_executorch_export(folder: str | Path) -> bool:
    """Whether `folder` is an ExecuTorch export (so `erde infer` runs it with ExecuTorch)."""
    return (Path(folder) / SPEC).is_file()


def _is_spec(path: Path) -> bool:
    try:
        return parse_json(path.read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
