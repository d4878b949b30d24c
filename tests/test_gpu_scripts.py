"""bench/cifar_parts.py: the data the GPU machine assembles must equal the source bit for bit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cifar_parts.py"
spec = importlib.util.spec_from_file_location("cifar_parts", SCRIPT)
assert spec and spec.loader
cifar_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar_parts)


def _write(root: Path) -> None:
    rng = np.random.default_rng(0)
    names = np.array(["a", "b", "c"])
    for split, n in (("train", 60), ("test", 20)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 3, n, dtype=np.uint8)
        np.savez_compressed(root / f"{split}.npz", x=x, y=y, label_names=names)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_round_trip_and_damage(tmp_path: Path) -> None:
    src, parts, out = tmp_path / "src", tmp_path / "parts", tmp_path / "out"
    src.mkdir()
    _write(src)
    m = cifar_parts.split(str(src), str(parts), part_mib=0.1)
    assert len(m["parts"]) > 1
    assert cifar_parts.assemble(str(parts), str(out)) is None
    for split in ("train", "test"):
        with np.load(src / f"{split}.npz") as a, np.load(out / f"{split}.npz") as b:
            for key in ("x", "y", "label_names"):
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
    part = parts / m["parts"][1]["name"]
    data = bytearray(part.read_bytes())
    data[5] ^= 1
    part.write_bytes(bytes(data))
    r = _run("assemble", "--parts", str(parts), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "part-01" in r.stderr


def test_real_parts_fit_the_limit() -> None:
    """A split of the real data at the default part size leaves room for the ~2 MB checkout."""
    for base in (ROOT / ".." / "shared", Path("/work/shared")):
        root = base / "data" / "cifar10"
        if (root / "train.npz").is_file():
            break
    else:
        pytest.skip("no ../shared/data/cifar10")
    total = sum(os.path.getsize(root / f"{s}.npz") for s in ("train", "test"))
    per_part = 56 * (1 << 20)
    assert per_part + 4 * (1 << 20) < 64 * (1 << 20)
    assert -(-total // per_part) == 3
