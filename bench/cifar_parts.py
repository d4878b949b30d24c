"""Full CIFAR-10 to a machine that receives at most 64 MiB per command: cut into parts, reassemble.

The device machine gets the checkout (~2 MB) plus what `carry` names, 64 MiB per command, and keeps
files written outside the checkout while it stays warm. So `split` cuts train.npz + test.npz (one
byte stream, in that order) into parts of at most `--part-mib` MiB with a manifest, one part is
carried per command and copied to a folder outside the checkout, and `assemble` joins them there.
Re-encoding does not pay: PNG/lzma of the uint8 arrays measured 0.66-0.70 of the raw bytes, still
three parts of 56 MiB, so the .npz bytes travel as they are (assembled files: byte-identical).

Array digest (recorded in the manifest, checked by `assemble`): per split, SHA-256 of `x.tobytes()`
(uint8, C order, N x 32 x 32 x 3) followed by `y.tobytes()` (uint8, N).

    python bench/cifar_parts.py split --root ../shared/data/cifar10 --out .devdata/cifar10-parts
    python bench/cifar_parts.py assemble --parts /tmp/parts --out /tmp/cifar10   # exit 2 on damage
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

SPLITS = ("train", "test")
MANIFEST = "manifest.json"
MiB = 1 << 20


def sha256(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def array_digest(path: str) -> str:
    """SHA-256 of the x bytes then the y bytes of one npz (the definition in the docstring)."""
    with np.load(path, allow_pickle=False) as f:
        x, y = np.ascontiguousarray(f["x"]), np.ascontiguousarray(f["y"])
    if x.dtype != np.uint8 or y.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: x must be uint8 N x 32 x 32 x 3 and y uint8")
    h = hashlib.sha256(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()


def split(root: str, out: str, part_mib: float) -> dict:
    """Write part-NN files and the manifest into `out`; return the manifest."""
    files, stream = [], b""
    for name in SPLITS:
        path = os.path.join(root, f"{name}.npz")
        with open(path, "rb") as fh:
            data = fh.read()
        files.append(
            {
                "name": f"{name}.npz",
                "offset": len(stream),
                "size": len(data),
                "file_sha256": sha256(data),
                "array_sha256": array_digest(path),
            }
        )
        stream += data
    size = int(part_mib * MiB)
    os.makedirs(out, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(stream), size)):
        chunk, name = stream[start : start + size], f"part-{i:02d}"
        with open(os.path.join(out, name), "wb") as fh:
            fh.write(chunk)
        parts.append({"name": name, "size": len(chunk), "sha256": sha256(chunk)})
    manifest = {"files": files, "parts": parts, "part_mib": part_mib}
    with open(os.path.join(out, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def assemble(parts_dir: str, out: str) -> str | None:
    """Join the parts into `out`/train.npz and test.npz; None, or the reason they are refused."""
    with open(os.path.join(parts_dir, MANIFEST)) as fh:
        manifest = json.load(fh)
    stream = b""
    for p in manifest["parts"]:
        path = os.path.join(parts_dir, p["name"])
        if not os.path.isfile(path):
            return f"{p['name']} is missing in {parts_dir}"
        with open(path, "rb") as fh:
            chunk = fh.read()
        if sha256(chunk) != p["sha256"]:
            return f"{p['name']}: SHA-256 differs from the manifest (damaged or incomplete copy)"
        stream += chunk
    os.makedirs(out, exist_ok=True)
    for f in manifest["files"]:
        data = stream[f["offset"] : f["offset"] + f["size"]]
        path = os.path.join(out, f["name"])
        with open(path, "wb") as fh:
            fh.write(data)
        if sha256(data) != f["file_sha256"] or array_digest(path) != f["array_sha256"]:
            os.remove(path)
            return f"{f['name']}: assembled arrays' SHA-256 differs from the manifest"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--root", default="../shared/data/cifar10")
    s.add_argument("--out", default=".devdata/cifar10-parts")
    s.add_argument("--part-mib", type=float, default=56.0, help="64 MiB minus checkout and margin")
    a = sub.add_parser("assemble")
    a.add_argument("--parts", required=True)
    a.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "split":
        m = split(args.root, args.out, args.part_mib)
        for p in m["parts"]:
            print(f"{args.out}/{p['name']}: {p['size'] / MiB:.1f} MiB")
        for f in m["files"]:
            print(f"{f['name']}: array sha256 {f['array_sha256']}")
    else:
        problem = assemble(args.parts, args.out)
        if problem:
            print(f"refused: {problem}", file=sys.stderr)
            sys.exit(2)
        print(f"assembled {args.out}/train.npz and test.npz; array SHA-256 match the manifest")


if __name__ == "__main__":
    main()
