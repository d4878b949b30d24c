"""Every shell and Python example of the README, run in order in one folder, so they stay true.

A block preceded by `<!-- skip-test: REASON -->` is skipped (it needs CIFAR-10, a GPU, a
cluster, a package this environment lacks); every other ```bash and ```python block runs as it
is written, on the embedded digits. The only setup is what a reader brings: two image files for
`erde infer`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!-- skip-test: (?P<skip>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)


def readme_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason or None) of every fenced block."""
    return [
        (text[: m.start("code")].count("\n"), m["lang"], m["code"], m["skip"])
        for m in _BLOCK.finditer(text)
    ]


def test_blocks_are_found_and_skips_say_why():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    runnable = [b for b in blocks if b[1] in ("bash", "python") and b[3] is None]
    assert len(runnable) >= 6
    assert all(b[3].strip() for b in blocks if b[3] is not None)


def _run(lang: str, code: str, cwd: Path, line: int) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"README.md line {line} ({lang}) failed with status {done.returncode}:\n{code}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    images = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)[..., None].repeat(3, axis=2)
    Image.fromarray(images).save(tmp_path / "photo1.png")
    Image.fromarray(images[::-1].copy()).save(tmp_path / "photo2.jpg")
    for line, lang, code, skip in readme_blocks(README.read_text(encoding="utf-8")):
        if lang in ("bash", "python") and skip is None:
            _run(lang, code, tmp_path, line)
