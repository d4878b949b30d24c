"""`manifest.json` of an export: the model it holds, the deployment threshold, and one entry per
ONNX file. Read and checked in one place (`read_manifest`); the runtime and the benchmark use the
typed `Manifest`, never the raw dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erde.errors import ErdeError
from erde.files import read_json, sha256_bytes
from erde.model_info import ModelInfo

FORMAT = "erde-early-exit-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
            "threshold": self.deployment.threshold,
            "policy": self.deployment.policy,
            "normalize": self.deployment.normalize,
            "threshold_source": self.deployment.threshold_source,
            "exit_macs": i.exit_macs,
            "static_macs": i.static_macs,
            "pieces": self.pieces,
            "static": self.static,
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
        threshold = raw["threshold"]
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise bad("has a 'threshold' that is not a finite number")
        if not isinstance(raw["policy"], str) or not isinstance(raw["normalize"], bool):
            raise bad("needs a 'policy' name and 'normalize' true or false")
        pieces = raw["pieces"]
        if not isinstance(pieces, list) or len(pieces) != info.num_exits:
            raise bad(f"must list one file in 'pieces' per exit ({info.num_exits})")
        for entry in [*pieces, raw["static"]]:
            _check_entry(entry, bad)
        return cls(
            info=info,
            deployment=Deployment(
                float(threshold), raw["policy"], raw["normalize"], str(raw["threshold_source"])
            ),
            pieces=pieces,
            static=raw["static"],
            opset=int(raw["opset"]),
            exporter=str(raw.get("exporter", "")),
            source_run=str(raw["source_run"]),
            weights_sha256=str(raw.get("weights_sha256", "")),
        )


_KEYS = (
    "source_run",
    "model",
    "arch",
    "classes",
    "input_size",
    "in_channels",
    "mean",
    "std",
    "data_source",
    "threshold",
    "policy",
    "normalize",
    "threshold_source",
    "exit_macs",
    "static_macs",
    "pieces",
    "static",
    "opset",
)


def _check_entry(entry: Any, bad) -> None:
    """A file entry names a plain file inside the export folder, with its checksum."""
    if not isinstance(entry, dict):
        raise bad("has a file entry that is not an object")
    name, digest = entry.get("file"), entry.get("sha256")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise bad(f"names {name!r}, not a plain file name inside the export folder")
    if not isinstance(digest, str) or len(digest) != 64:
        raise bad(f"gives no SHA-256 for {name!r}")


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


def read_verified(export_dir: Path, entry: dict) -> bytes:
    """A file of the export, checked against the manifest's SHA-256 (read once, then used)."""
    path = Path(export_dir) / entry["file"]
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ErdeError(
            f"{path} is missing from the export; re-create the folder with `erde export`"
        ) from None
    if sha256_bytes(blob) != entry["sha256"]:
        raise ErdeError(
            f"{path} does not match the checksum in {Path(export_dir) / MANIFEST} (altered or "
            "corrupt); re-create the folder with `erde export`"
        )
    return blob
