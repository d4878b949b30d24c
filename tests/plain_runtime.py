"""An erde export driven by someone who has only its folder: ONNX Runtime, numpy and Pillow,
following manifest.json (and what DEPLOY.md says in prose), without importing erde.

    python plain_runtime.py EXPORT_DIR IMAGE...

prints {"split": [[class, exit], ...], "single": [[class, exit], ...]}: the answer per image of
the pieces chained by hand (the whole batch) and of single.onnx (one call per image).
tests/test_deploy_spec.py runs it in a subprocess and compares with `erde infer`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def pixels(path: str, pre: dict) -> np.ndarray:
    """One image file as uint8 input_size x input_size x channels, by `preprocess`."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "PA"):  # palette expanded
            img = img.convert("RGBA")
        img = img.convert("L" if img.mode in ("1", "L", "LA", "La") else "RGB")  # alpha dropped
    img = img.convert("L" if pre["channels"] == "grey" else "RGB")
    resize, crop = pre["resize"], pre["crop"]
    assert resize["side"] == "shorter" and crop["where"] == "centre"
    width, height = img.size
    to = resize["to"]
    if min(width, height) != to:  # the longer side: floor(to * longer / shorter)
        if width <= height:
            width, height = to, math.floor(to * height / width)
        else:
            width, height = math.floor(to * width / height), to
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    size = crop["size"]
    left, top = (width - size) // 2, (height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def batch(paths: list[str], pre: dict) -> np.ndarray:
    """float32 N x C x H x W: (pixel / divide_by - mean) / std per channel."""
    x = np.stack([pixels(p, pre) for p in paths]).astype(np.float64) / pre["divide_by"]
    x = (x - np.asarray(pre["mean"])) / np.asarray(pre["std"])
    assert pre["layout"] == "NCHW" and pre["dtype"] == "float32"
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def session(folder: Path, entry: dict) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])


def split(folder: Path, manifest: dict, x: np.ndarray) -> list[tuple[str, int]]:
    """Piece by piece: images whose score is below the threshold leave; the rest go on."""
    exits, classes = manifest["exits"], manifest["classes"]
    threshold = np.float32(exits["threshold"])
    answers: list = [None] * len(x)
    active, features = np.arange(len(x)), x
    for k, piece in enumerate(manifest["pieces"]):
        assert piece["exit"] == k + 1
        s = session(folder, piece)
        out = dict(zip([o["name"] for o in piece["outputs"]], s.run(None, {
            piece["inputs"][0]["name"]: features}), strict=True))  # fmt: skip
        last = k == exits["count"] - 1
        logits = out[f"logits{k + 1}"]
        done = np.ones(len(active), bool) if last else out[f"score{k + 1}"] < threshold
        for j in np.flatnonzero(done):
            answers[active[j]] = (classes[int(np.argmax(logits[j]))], k + 1)
        if last or done.all():
            break
        active, features = active[~done], out[f"features{k + 1}"][~done]
    return answers


def single(folder: Path, manifest: dict, x: np.ndarray) -> list[tuple[str, int]]:
    """One single.onnx call per image, its `thresholds` one value per deciding exit."""
    s, exits = session(folder, manifest["single"]), manifest["exits"]
    cuts = np.full(exits["count"] - 1, exits["threshold"], np.float32)
    answers = []
    for j in range(len(x)):
        logits, exit_at = s.run(["logits", "exit"], {"image": x[j : j + 1], "thresholds": cuts})
        answers.append((manifest["classes"][int(np.argmax(logits[0]))], int(exit_at[0])))
    return answers


def main(folder: str, paths: list[str]) -> dict:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    x = batch(paths, manifest["preprocess"])
    return {"split": split(Path(folder), manifest, x), "single": single(Path(folder), manifest, x)}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2:])
    assert not any(name == "erde" or name.startswith("erde.") for name in sys.modules)
    print(json.dumps(result))
