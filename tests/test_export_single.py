"""The single-call form (`single.onnx`, one `If` per exit) and the exporter's requirements, on a
small digits student exported once for the module."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from erde.checkpoint import load_model
from erde.config import load_config
from erde.deploy import EarlyExitRuntime, export_run, onnx_export
from erde.errors import ErdeError
from erde.evaluation.policy import confidence_scores, simulate
from erde.train import fit


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    cfg = load_config(
        "digits-student",
        ["model.name=resnet8", "train.epochs=2", "train.batch_size=128", "data.crop_padding=1"],
    )
    fit(cfg, root / "run", progress=False)
    export_run(root / "run", root / "export", threshold=1.0)
    return root / "run", root / "export"


@pytest.fixture(scope="module")
def inputs(exported):
    """Random inputs and every exit's logits from the PyTorch model (the simulator's input)."""
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model, _ = load_model(exported[0])
    with torch.no_grad():
        return x, torch.stack(model(x), dim=1)


@pytest.mark.slow
def test_single_graph_decides_inside_onnx_runtime(exported, inputs):
    """A plain ONNX Runtime session on the file: nested Ifs, and the exits `simulate` gives."""
    path = exported[1] / "single.onnx"
    graph = onnx.load(str(path)).graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == 1  # the second If lives in the first one's else branch
    inner = next(a.g for a in ifs[0].attribute if a.name == "else_branch")
    assert [n.op_type for n in inner.node].count("If") == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, logits = inputs
    scores = confidence_scores(logits, "entropy")[:, :2]
    threshold = [float(scores[:, 0].quantile(0.3)), float(scores[:, 1].quantile(0.5))]
    want, _ = simulate(logits, threshold)
    assert set(want.tolist()) == {0, 1, 2}
    cut = np.asarray(threshold, np.float32)
    for k in range(len(x)):
        out, exit_index = session.run(None, {"image": x[k : k + 1].numpy(), "thresholds": cut})
        if (scores[k] - torch.tensor(threshold)).abs().min() > 1e-5:  # not a tie
            assert exit_index.tolist() == [int(want[k])]
            np.testing.assert_allclose(out[0], logits[k, want[k]].numpy(), atol=1e-4)


@pytest.mark.slow
def test_batch_one_is_one_call_and_larger_batches_are_split(exported, inputs):
    rt = EarlyExitRuntime.from_export(exported[1], threads=1)
    calls = {"single": 0, "pieces": 0}

    def counted(kind, fn):
        def run(*args):
            calls[kind] += 1
            return fn(*args)

        return run

    rt.single = counted("single", rt.single)
    rt.pieces = [counted("pieces", p) for p in rt.pieces]
    x, logits = inputs
    for threshold in (0.0, 1e9):
        one = rt.predict(x[:1], threshold)
        assert calls == {"single": 1, "pieces": 0}
        calls.update(single=0)
        want = 0 if threshold else 2
        assert one.exit_index.tolist() == [want] and one.images_per_piece[want] == 1
        np.testing.assert_allclose(one.logits[0], logits[0, want].numpy(), atol=1e-4)
    rt.predict(x[:2], 0.0)
    assert calls == {"single": 0, "pieces": 3}
    rt.predict(x[:2], 0.0, form="single")
    assert calls == {"single": 2, "pieces": 3}
    with pytest.raises(ErdeError, match="unknown runtime form 'fast'"):
        rt.predict(x[:1], form="fast")
    torch_rt = EarlyExitRuntime.from_run(exported[0], threshold=1.0)
    with pytest.raises(ErdeError, match="has no single-call graph"):
        torch_rt.predict(x[:1], form="single")


def test_export_without_onnxscript_says_what_to_install(monkeypatch):
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ErdeError, match="needs the onnxscript package"):
        onnx_export.check_exporter()


@pytest.mark.slow
def test_inference_needs_no_onnxscript(exported):
    """A machine without onnxscript (or PyTorch's exporter) still runs an export."""
    code = (
        "import sys; sys.modules['onnxscript'] = None\n"
        "import numpy as np\n"
        "from erde.deploy import EarlyExitRuntime\n"
        f"rt = EarlyExitRuntime.from_export({str(exported[1])!r}, threads=1)\n"
        "print(rt.predict(np.zeros((1, 1, 8, 8), np.float32)).exit_index.tolist())\n"
        "print('onnxscript' in sys.modules and sys.modules['onnxscript'] is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.split("\n")[1] == "False"
    assert done.stdout.split("\n")[0] in ("[0]", "[1]", "[2]")
