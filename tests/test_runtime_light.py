"""The ONNX runtime without PyTorch: `EarlyExitRuntime.from_export` and `erde infer` import only
numpy, ONNX Runtime and Pillow (checked in fresh processes, once with PyTorch and the other heavy
libraries made unimportable, once in a real venv of its own), its numpy normalisation equals
training's torch one bit for bit, and its reader of ONNX files (`onnx_wire`) sees what the `onnx`
package sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from sklearn.datasets import load_digits

from erde.cli.main import main
from erde.data.decode import normalize_array
from erde.data.pixels import Normalize
from erde.deploy import export_run, single
from erde.deploy import runtime as runtime_module
from erde.deploy.images import image_paths
from erde.deploy.onnx_export import shapes
from erde.deploy.onnx_wire import graph_facts
from erde.errors import ErdeError

HEAVY = ("torch", "torchvision", "optuna", "matplotlib", "omegaconf", "scipy")
SRC = Path(__file__).resolve().parents[1] / "src"


def _env(extra_path: Path | None = None) -> dict[str, str]:
    """This checkout's src first, so the subprocess runs the erde under test."""
    paths = [str(p) for p in (extra_path, SRC) if p is not None]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([old] if old else [])])}


def _python(code: str, cwd: Path, extra_path: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(extra_path), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("light") / "export"
    export_run(teacher, out, threshold=1.0)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    pixels = (load_digits().images[:5] * 255 / 16).round().astype(np.uint8)
    for k, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"digit{k}.png")
    return sorted(folder.glob("*.png"))


MODULES_AFTER = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


def test_from_export_and_predict_import_no_heavy_library(exported, digits, tmp_path):
    body = textwrap.dedent(f"""
        import numpy as np
        from erde.deploy import EarlyExitRuntime
        rt = EarlyExitRuntime.from_export({str(exported)!r}, threads=1)
        rt.predict(np.zeros((2, rt.in_channels, rt.input_size, rt.input_size), np.float32))
        rt.predict(np.zeros((1, rt.in_channels, rt.input_size, rt.input_size), np.float32))
        rt.classify_files({[str(p) for p in digits]!r})
    """)
    loaded = json.loads(_python(MODULES_AFTER.format(body=body), tmp_path))
    assert not set(HEAVY) & set(loaded), loaded
    assert {"numpy", "onnxruntime", "PIL"} <= set(loaded)


def test_erde_infer_imports_no_heavy_library(exported, digits, tmp_path):
    body = textwrap.dedent(f"""
        import runpy
        sys.argv = ["erde", "infer", {str(exported)!r}, {str(digits[0])!r}, "--threads", "1"]
        try:
            runpy.run_module("erde", run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
    """)
    out = _python(MODULES_AFTER.format(body=body), tmp_path)
    loaded = json.loads(out.splitlines()[-1])
    assert "| digit0.png |" in out.replace(str(digits[0].parent) + os.sep, "")
    assert not set(HEAVY) & set(loaded), loaded


BLOCKER = """
import importlib.abc
import sys

HEAVY = {heavy!r}


class Unimportable(importlib.abc.MetaPathFinder):
    \"\"\"As if these packages were not installed.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Unimportable())
"""


@pytest.mark.slow
def test_erde_infer_answers_the_same_with_pytorch_unimportable(exported, digits, tmp_path):
    """A runtime-only install simulated: a sitecustomize on PYTHONPATH makes the heavy packages
    unimportable in the subprocess; offline, unlike the real venv below, and it blocks the other
    heavy libraries too."""
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(heavy=HEAVY), encoding="utf-8")
    args = ["-m", "erde", "infer", str(exported), *map(str, digits), "--format", "json"]
    args += ["--threads", "1", "--threshold", "0.5"]

    def infer(extra_path: Path | None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=_env(extra_path), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    blocked, plain = infer(blocker), infer(None)
    assert blocked.returncode == plain.returncode == 0, blocked.stderr[-3000:]
    assert json.loads(blocked.stdout) == json.loads(plain.stdout)
    refused = subprocess.run([sys.executable, "-c", "import torch"], env=_env(blocker),
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode != 0 and "No module named 'torch'" in refused.stderr


@pytest.mark.parametrize(
    "channels, mean, std",
    [(1, [0.1307], [0.3081]), (3, [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]),
     (3, [0.0, 1.0, 0.5], [1e-6, 1.0, 0.3333333333333333])],
)  # fmt: skip
def test_numpy_normalisation_equals_the_torch_one_bit_for_bit(channels, mean, std):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (7, 9, 5, channels), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    got = normalize_array(images, mean, std)
    want = Normalize(mean, std)(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    assert got.shape == want.shape and got.tobytes() == want.tobytes()


def test_wire_reader_sees_what_onnx_sees(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    for entry in [*manifest["pieces"], manifest["static"], manifest["single"]]:
        blob = (exported / entry["file"]).read_bytes()
        model = onnx.load_model_from_string(blob)
        facts = graph_facts(blob)
        assert facts.inputs == shapes(model.graph.input) == unexplained(entry["inputs"])
        assert facts.outputs == shapes(model.graph.output) == unexplained(entry["outputs"])
        assert not facts.external_data


def unexplained(tensors: list[dict]) -> list[dict]:
    """The manifest's tensor entries without the meaning it gives them for people."""
    return [{k: v for k, v in t.items() if k != "meaning"} for t in tensors]


def _with_external_weight(in_subgraph: bool) -> bytes:
    """A tiny graph whose one weight (in an If branch, or at the top) lies in an external file."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    del weight.float_data[:]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    if not in_subgraph:
        node = helper.make_node("Add", ["x", "w"], ["y"])
        return helper.make_model(
            helper.make_graph([node], "g", [x], [y], [weight])
        ).SerializeToString()
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=weight)], "b", [], [y]
    )
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    return helper.make_model(helper.make_graph([node], "g", [x, c], [y])).SerializeToString()


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_wire_reader_finds_external_data(in_subgraph):
    facts = graph_facts(_with_external_weight(in_subgraph))
    assert facts.external_data
    assert facts.inputs[0] == {"name": "x", "shape": ["batch", 1]}


@pytest.mark.parametrize(
    "blob", [b"\xff", b"\x0a\x05ab", b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
)
def test_wire_reader_refuses_what_is_no_protobuf(blob):
    with pytest.raises(ValueError):
        graph_facts(blob)


def test_runtime_names_the_single_graph_tensors_as_the_builder_does():
    names = (runtime_module.THRESHOLDS, runtime_module.LOGITS, runtime_module.EXIT)
    assert names == (single.THRESHOLDS, single.LOGITS, single.EXIT)


def test_from_run_without_pytorch_says_what_to_do(tmp_path):
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(heavy=HEAVY), encoding="utf-8")
    code = textwrap.dedent("""
        from erde.deploy import EarlyExitRuntime
        from erde.errors import ErdeError
        try:
            EarlyExitRuntime.from_run("runs/erde")
        except ErdeError as exc:
            print(exc)
    """)
    out = _python(code, tmp_path, blocker)
    assert "from_run needs PyTorch" in out and "from_export" in out and "\n" not in out.strip()


def test_image_arguments_expand_folders_and_patterns(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", "sub/d.png", "sub/deeper/e.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    t = str(tmp_path)
    assert image_paths([t]) == [f"{t}/a.JPG", f"{t}/b.png"]  # not c.txt, not sub/
    assert image_paths([f"{t}/*.png", f"{t}/missing.png"]) == [f"{t}/b.png", f"{t}/missing.png"]
    assert image_paths([f"{t}/**/*.png"]) == [f"{t}/b.png", f"{t}/sub/d.png"]
    assert image_paths([f"{t}/s*/**"]) == [f"{t}/sub/d.png", f"{t}/sub/deeper/e.bmp"]
    with pytest.raises(ErdeError, match=r"su\? matches no file"):  # only a folder
        image_paths([f"{t}/su?"])
    (tmp_path / "odd[1].png").write_bytes(b"")  # a real file whose name looks like a pattern
    assert image_paths([f"{t}/odd[1].png"]) == [f"{t}/odd[1].png"]
    with pytest.raises(ErdeError, match=r"\*\.gif matches no file"):
        image_paths([f"{t}/*.gif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErdeError, match="empty is a folder without image files"):
        image_paths([f"{t}/empty"])


def test_erde_infer_reads_a_folder_in_name_order(exported, digits, capsys):
    assert main(["infer", str(exported), str(digits[0].parent), "--format", "csv",
                 "--threads", "1"]) == 0  # fmt: skip
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(p) for p in digits]


def test_a_number_where_a_graph_node_belongs_is_no_onnx_model():
    """ModelProto.graph (field 7, bytes 08 01) whose node (field 1) is the varint 1: found by
    the export fuzz test as a TypeError; a damaged file must be a ValueError (one line above)."""
    with pytest.raises(ValueError, match="a number where a message belongs"):
        graph_facts(b"\x3a\x02\x08\x01")


def _runtime_extra() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    with open(SRC.parent / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["runtime"]


@pytest.mark.slow
def test_erde_infer_in_a_real_runtime_only_venv(exported, digits, tmp_path):
    """README's "Deploying without PyTorch" as written: a venv of its own, erde with --no-deps and
    the `runtime` extra from the registry; no torch there, and the same answers as here."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["--no-deps", str(SRC.parent)], _runtime_extra()):
        done = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    args = ["infer", str(exported), *map(str, digits), "--format", "json", "--threads", "1"]
    args += ["--threshold", "0.5"]
    there = subprocess.run([str(venv / "bin" / "erde"), *args], env=clean, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    here = subprocess.run([sys.executable, "-m", "erde", *args], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert there.returncode == here.returncode == 0, there.stderr[-3000:]
    assert json.loads(there.stdout) == json.loads(here.stdout)
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], env=clean,
                              capture_output=True, text=True)  # fmt: skip
    assert "No module named 'torch'" in no_torch.stderr
