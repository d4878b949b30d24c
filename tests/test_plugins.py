"""A model registered by the user's own package is found in a fresh process: through an
`erde.models` entry point, or through `model.module`; a plugin that fails to import is one line."""

import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
from torch import nn
from erde.models import Backbone, register_model


@register_model
def tiny_plugin_net(*, num_classes: int, in_channels: int, width: int = 8) -> Backbone:
    """A two-block test network from a user's package."""
    blocks = [nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(2)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    stem = nn.Conv2d(in_channels, width, 3, padding=1)
    return Backbone(stem=stem, blocks=blocks, classifier=head, stage_ends=[1, 2], min_input_size=1)
'''


def run_erde(tmp_path, *args, entry_point=False, trust=None):
    pkg = tmp_path / "site" / "my_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(PLUGIN))
    if entry_point:
        info = tmp_path / "site" / "my_pkg-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_pkg\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[erde.models]\nmy_pkg = my_pkg.models\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ERDE_TRUST_MODULES", None)
    if trust:
        env["ERDE_TRUST_MODULES"] = trust
    return subprocess.run(
        [sys.executable, "-m", "erde", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )


def test_entry_point_model_is_listed_and_built(tmp_path):
    done = run_erde(tmp_path, "models", "tiny*", entry_point=True)
    assert done.returncode == 0, done.stderr
    assert "tiny_plugin_net | my_pkg | 1 |" in done.stdout
    done = run_erde(tmp_path, "macs", "tiny_plugin_net", entry_point=True)
    assert done.returncode == 0 and "| 2 | 2 |" in done.stdout


def test_model_module_is_imported_for_a_config(tmp_path):
    done = run_erde(
        tmp_path, "config", "model.name=tiny_plugin_net", "model.module=my_pkg.models",
        "model.options.width=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "module: my_pkg.models" in done.stdout and "width: 4" in done.stdout


@pytest.mark.slow
def test_plugin_model_trains_evaluates_exports_and_infers(tmp_path):
    run = [
        "train", "digits-teacher", "model.name=tiny_plugin_net", "model.module=my_pkg.models",
        "model.options.width=4", "train.epochs=2", "train.warmup_epochs=0", "--out", "run",
        "--no-progress",
    ]  # fmt: skip
    assert run_erde(tmp_path, *run).returncode == 0
    done = run_erde(tmp_path, "evaluate", "run")  # the run's module, imported only if allowed
    assert done.returncode == 2 and "ERDE_TRUST_MODULES=my_pkg.models" in done.stderr
    for args in (["evaluate", "run"], ["export", "run", "--out", "exp"]):
        done = run_erde(tmp_path, *args, trust="my_pkg")
        assert done.returncode == 0, (args, done.stderr)
    from PIL import Image

    Image.new("L", (8, 8), 128).save(tmp_path / "img.png")
    done = run_erde(tmp_path, "infer", "exp", "img.png")
    assert done.returncode == 0, done.stderr


def test_plugin_that_fails_to_import_is_one_line(tmp_path):
    done = run_erde(tmp_path, "macs", "tiny_plugin_net", "--in-channels", "1")
    assert done.returncode == 2 and "unknown model 'tiny_plugin_net'" in done.stderr
    done = run_erde(tmp_path, "train", "digits-teacher", "model.module=no_such_pkg", "--out", "r")
    assert done.returncode == 2
    assert "model.module='no_such_pkg' failed to import (ModuleNotFoundError" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
