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

from erde.config.schema import load_config
from erde.deploy import EarlyExitRuntime, export_run, onnx_export
from erde.deploy.single import single_graph
from erde.errors import ErdeError
from erde.evaluation.policy import confidence_scores, simulate
from erde.models.load import load_model
from erde.train.engine import fit


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


def toy_pieces(n_exits: int, weights: np.ndarray) -> list[onnx.ModelProto]:
    """Pieces shaped like an export's, small enough to follow by hand: piece k takes x (N x 4),
    passes x + 1 on, answers logits x @ weights[k] and scores column k of x."""
    h = onnx.helper
    pieces = []
    for k in range(n_exits):
        last = k == n_exits - 1
        x = "image" if k == 0 else f"features{k}"
        nodes = [h.make_node("MatMul", [x, "w"], [f"logits{k + 1}"], name="linear")]
        inits = [onnx.numpy_helper.from_array(weights[k], "w")]
        outputs = [h.make_tensor_value_info(f"logits{k + 1}", onnx.TensorProto.FLOAT, ["N", 3])]
        if not last:
            nodes += [
                h.make_node("Add", [x, "one"], [f"features{k + 1}"], name="next"),
                h.make_node("Gather", [x, "column"], [f"score{k + 1}"], name="score", axis=1),
            ]
            inits += [
                onnx.numpy_helper.from_array(np.float32(1.0), "one"),
                onnx.numpy_helper.from_array(np.int64(k), "column"),
            ]
            outputs = [
                h.make_tensor_value_info(f"features{k + 1}", onnx.TensorProto.FLOAT, ["N", 4]),
                outputs[0],
                h.make_tensor_value_info(f"score{k + 1}", onnx.TensorProto.FLOAT, ["N"]),
            ]
        graph = h.make_graph(
            nodes,
            f"piece{k + 1}",
            [h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", 4])],
            outputs,
            initializer=inits,
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
        model.ir_version = 10
        pieces.append(model)
    return pieces


@pytest.mark.parametrize("n_exits", [1, 2, 3])
def test_single_graph_answers_at_the_first_exit_below_its_own_threshold(n_exits):
    """Any number of exits, one threshold per deciding exit, against the rule done by hand."""
    rng = np.random.default_rng(n_exits)
    weights = rng.standard_normal((n_exits, 4, 3)).astype(np.float32)
    model = single_graph(toy_pieces(n_exits, weights))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = set()
    for _ in range(60):
        image = rng.uniform(-1, 2, (1, 4)).astype(np.float32)
        cut = rng.choice([0.0, 0.5, 1.5, 3.0], n_exits - 1).astype(np.float32)
        # Piece k sees image + k and scores its column k.
        want = next((k for k in range(n_exits - 1) if image[0, k] + k < cut[k]), n_exits - 1)
        seen.add(want)
        logits, exit_index = session.run(None, {"image": image, "thresholds": cut})
        assert exit_index.tolist() == [want + 1]
        np.testing.assert_allclose(logits, (image + want) @ weights[want], atol=1e-5)
    assert seen == set(range(n_exits))


def test_single_graph_keeps_an_image_whose_score_equals_its_threshold() -> None:
    """`Less`, strictly: piece k scores image[k] + k, so image 0.5 scores 0.5 at exit 1 and 1.5
    at exit 2; at thresholds (0.5, 1.5) both are ties and the last exit answers."""
    weights = np.random.default_rng(0).standard_normal((3, 4, 3)).astype(np.float32)
    model = single_graph(toy_pieces(3, weights))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.full((1, 4), 0.5, np.float32)
    for cut, want in (((0.5, 1.5), 3), ((0.5, 1.5000001), 2), ((0.50000006, 1.5), 1)):
        _, exit_index = session.run(None, {"image": image, "thresholds": np.float32(cut)})
        assert exit_index.tolist() == [want]


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
            assert exit_index.tolist() == [int(want[k]) + 1]
            np.testing.assert_allclose(out[0], logits[k, want[k]].numpy(), atol=1e-4)


@pytest.mark.slow
def test_batch_one_is_one_call_and_larger_batches_are_split(exported, inputs):
    rt = EarlyExitRuntime.from_export(exported[1], threads=1)
    calls = {"single": 0, "pieces": 0, "static": 0}

    def counted(kind, fn):
        def run(*args):
            calls[kind] += 1
            return fn(*args)

        return run

    rt.single = counted("single", rt.single)
    rt.pieces = [counted("pieces", p) for p in rt.pieces]
    rt.static = counted("static", rt.static)
    x, logits = inputs
    for threshold in (1e-6, 1e9):  # no image below 1e-6 entropy: all leave at the last exit
        one = rt.predict(x[:1], threshold)
        assert calls == {"single": 1, "pieces": 0, "static": 0}
        calls.update(single=0)
        want = 0 if threshold > 1 else 2
        assert one.exits.tolist() == [want + 1] and one.images_per_piece[want] == 1
        np.testing.assert_allclose(one.logits[0], logits[0, want].numpy(), atol=1e-4)
    rt.predict(x[:2], 1e-6)
    assert calls == {"single": 0, "pieces": 3, "static": 0}
    rt.predict(x[:2], 1e-6, form="single")
    assert calls == {"single": 2, "pieces": 3, "static": 0}
    with pytest.raises(ErdeError, match="unknown runtime form 'fast'"):
        rt.predict(x[:1], form="fast")
    torch_rt = EarlyExitRuntime.from_run(exported[0], threshold=1.0)
    with pytest.raises(ErdeError, match="has no single-call graph"):
        torch_rt.predict(x[:1], form="single")


@pytest.mark.slow
def test_threshold_zero_runs_the_static_network(exported, inputs):
    """No score is below 0, so no image can leave early: `auto` runs static.onnx, one call per
    batch, with the last exit's answers; a forced form still runs the exits."""
    rt = EarlyExitRuntime.from_export(exported[1], threads=1)
    calls = {"static": 0, "single": 0}
    static, single = rt.static, rt.single
    rt.static = lambda x: (calls.update(static=calls["static"] + 1), static(x))[1]
    rt.single = lambda x, c: (calls.update(single=calls["single"] + 1), single(x, c))[1]
    x, logits = inputs
    want, _ = simulate(logits, 0.0)
    assert set(want.tolist()) == {2}
    for batch in (x[:1], x):
        got = rt.predict(batch, 0.0)
        assert got.exits.tolist() == [3] * len(batch)
        assert got.images_per_piece == [len(batch)] * 3
        np.testing.assert_allclose(got.logits, logits[: len(batch), 2].numpy(), atol=1e-4)
        assert got.labels.tolist() == logits[: len(batch), 2].argmax(dim=1).tolist()
    assert calls == {"static": 2, "single": 0}
    assert rt.predict(x[:1], 0.0, form="single").exits.tolist() == [3]
    assert calls == {"static": 2, "single": 1}


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
        "print(rt.predict(np.zeros((1, 1, 8, 8), np.float32)).exits.tolist())\n"
        "print('onnxscript' in sys.modules and sys.modules['onnxscript'] is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.split("\n")[1] == "False"
    assert done.stdout.split("\n")[0] in ("[1]", "[2]", "[3]")


@pytest.mark.slow
def test_single_onnx_numbers_exits_from_one_as_the_runtime_does(exported, inputs):
    """A plain ONNX Runtime call on single.onnx gives the exit `erde infer` reports (1..n)."""
    session = ort.InferenceSession(
        str(exported[1] / "single.onnx"), providers=["CPUExecutionProvider"]
    )
    rt = EarlyExitRuntime.from_export(exported[1], threads=1)
    x, logits = inputs
    scores = confidence_scores(logits, "entropy")[:, :2]
    threshold = [float(scores[:, 0].quantile(0.3)), float(scores[:, 1].quantile(0.5))]
    split = rt.predict(x, threshold, form="split").exits
    single = rt.predict(x, threshold, form="single").exits
    cut = np.asarray(threshold, np.float32)
    plain = [
        int(session.run(["exit"], {"image": x[k : k + 1].numpy(), "thresholds": cut})[0][0])
        for k in range(len(x))
    ]
    assert set(plain) == {1, 2, 3}
    assert plain == single.tolist() == split.tolist()
