"""`erde export --int8`: QDQ graphs, decisions on the quantized logits, and the threshold re-chosen
on them; on a small digits student trained and evaluated once for the module."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from erde.config.schema import load_config
from erde.data.pixels import normalize_images
from erde.data.prepare import prepare_data
from erde.deploy import EarlyExitRuntime, benchmark, export_run, render_benchmark
from erde.deploy.threshold import budget_thresholds
from erde.evaluation.policy import confidence_scores, simulate
from erde.evaluation.runs import evaluate_run
from erde.train.engine import fit

TIE = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("int8") / "student"
    cfg = load_config(
        "digits-student",
        ["model.name=resnet8", "train.epochs=3", "train.batch_size=128", "data.crop_padding=1"],
    )
    fit(cfg, run_dir, progress=False)
    return run_dir, evaluate_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8-export") / "model"
    return out, export_run(run[0], out, int8=True)


@pytest.fixture(scope="module")
def splits(run):
    split = prepare_data(load_config(str(run[0] / "config.yaml")))
    d = split.data
    return {
        k: (normalize_images(x, d.mean, d.std), y)
        for k, (x, y) in (("val", split.val), ("test", split.test))
    }


def quantized_logits(export_dir, x: torch.Tensor) -> torch.Tensor:
    """Every exit's logits from plain ONNX Runtime sessions on the int8 piece files."""
    sessions = [
        ort.InferenceSession(str(export_dir / f"exit{i}.onnx"), providers=["CPUExecutionProvider"])
        for i in (1, 2, 3)
    ]
    features, per_exit = x.numpy(), []
    for s in sessions:
        out = s.run(None, {s.get_inputs()[0].name: features})
        features = out[0]
        per_exit.append(out[1] if len(out) > 1 else out[0])
    return torch.from_numpy(np.stack(per_exit, axis=1))


@pytest.mark.slow
def test_graphs_are_qdq_with_per_channel_weights_and_float_scores(exported):
    out, manifest = exported
    assert manifest.precision == "int8" and manifest.quantization["format"] == "QDQ"
    graph = onnx.load(str(out / "exit2.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    assert conv_weights
    producers = {o: n for n in graph.node for o in n.output}
    for name in conv_weights:
        dq = producers[name]
        assert dq.op_type == "DequantizeLinear"
        scale = onnx.numpy_helper.to_array(weights[dq.input[1]])
        assert scale.ndim == 1 and scale.size > 1  # one scale per output channel
    # The stem, the one convolution on the 1-channel image, stays float32 (int8 gains nothing on
    # one channel); every later one is int8.
    for name in ("exit1.onnx", "static.onnx"):
        g = onnx.load(str(out / name)).graph
        floats = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}
        convs = [n for n in g.node if n.op_type == "Conv"]
        assert convs[0].input[0] == "image" and convs[0].input[1] in floats
        assert not any(n.input[1] in floats for n in convs[1:])
    assert "input channels" in manifest.quantization["float32"]
    # Nothing downstream of the logits (the exit score) is quantized.
    reached = {"logits2"}
    for node in graph.node:
        if reached.intersection(node.input):
            assert node.op_type not in ("QuantizeLinear", "DequantizeLinear"), node.name
            reached.update(node.output)
    assert "score2" in reached


@pytest.mark.slow
def test_int8_runtime_agrees_with_the_simulator_on_quantized_logits(exported, splits):
    out, _ = exported
    x = torch.cat([splits["val"][0], splits["test"][0]])
    logits = quantized_logits(out, x)
    scores = confidence_scores(logits, "entropy")
    rt = EarlyExitRuntime.from_export(out, threads=1)
    per_exit = [float(scores[:, 0].quantile(0.3)), float(scores[:, 1].quantile(0.5))]
    for threshold in (per_exit, float(scores[:, 0].quantile(0.5))):
        want, labels = simulate(logits, threshold)
        assert len(set(want.tolist())) >= 2
        cut = torch.tensor(threshold).expand(2)
        reached = torch.arange(2)[None, :] <= want[:, None]
        tie = (((scores[:, :2] - cut).abs() < TIE) & reached).any(dim=1).numpy()
        for form in ("split", "single"):
            pred = rt.predict(x, threshold, form=form)
            same = pred.exits == want.numpy() + 1  # simulate's exits are 0-based
            assert np.all(same | tie), f"{form}: {(~same & ~tie).sum()} differ"
            assert np.all((pred.labels == labels.numpy()) | tie)


@pytest.mark.slow
def test_threshold_is_rechosen_on_the_int8_validation_outputs(run, exported, splits):
    _, report = run
    out, manifest = exported
    assert manifest.deployment.threshold_source.startswith("re-calibrated on the int8 model's val")
    assert manifest.quantization["fp32_threshold"] == report.chosen.threshold
    val_x, val_y = splits["val"]
    logits = quantized_logits(out, val_x)
    threshold = manifest.deployment.threshold
    target = report.reference.val_accuracy - report.max_drop_points / 100
    accuracy = float((simulate(logits, threshold)[1] == val_y).float().mean())
    if "not reached" in manifest.deployment.threshold_source:
        assert threshold == 0.0
    else:
        assert accuracy >= target
        # ... and at the fewest val MACs of any threshold that reaches it, found by trying every
        # distinct one: theta 0, and one float32 step above each deciding exit's scores.
        macs = np.asarray(manifest.info.exit_macs, dtype=np.float64)
        scores = confidence_scores(logits, "entropy")[:, :-1].numpy().reshape(-1)
        steps = np.nextafter(np.unique(scores), np.float32(np.inf))
        best = np.inf
        for theta in [0.0, *steps.tolist()]:
            exits, labels = simulate(logits, theta)
            if float((labels == val_y).float().mean()) >= target:
                best = min(best, float(macs[exits.numpy()].mean()))
        chosen_macs = float(macs[simulate(logits, threshold)[0].numpy()].mean())
        assert chosen_macs == pytest.approx(best, rel=1e-12)
        assert best < macs[-1]  # an early-exit point, not the full model
    # The val curve in the manifest is the quantized model's: each point is what its threshold
    # gives on the int8 pieces' val outputs.
    macs = np.asarray(manifest.info.exit_macs, dtype=np.float64)
    assert manifest.val_curve["images"] == len(val_y)
    for point in manifest.val_curve["points"]:
        exits, labels = simulate(logits, point["threshold"])
        assert point["val_accuracy"] == float((labels == val_y).double().mean())
        assert point["expected_macs"] == pytest.approx(float(macs[exits.numpy()].mean()))
    # The accuracy per exit the manifest records is that of the quantized pieces.
    per_exit = (logits.argmax(-1) == val_y[:, None]).float().mean(0).tolist()
    np.testing.assert_allclose(manifest.quantization["per_exit_accuracy"]["val"], per_exit)
    # Quantization costs little accuracy at the final exit here either.
    assert abs(per_exit[-1] - report.per_exit_accuracy["val"][-1]) < 0.03


@pytest.mark.slow
def test_bench_times_int8_next_to_fp32(run, exported, splits):
    result = benchmark(run[0], int8=True, batch_sizes=[1, 4], repeats=3, warmup=1)
    rows = {(r.model, r.threshold, r.batch): r for r in result.rows}
    # the same export, made again by the benchmark
    int8_threshold = exported[1].deployment.threshold
    for batch in (1, 4):
        assert ("student resnet8 int8, static", None, batch) in rows
        own = rows[("student resnet8 int8, early exit", int8_threshold, batch)]
        assert own.tag == " (re-calibrated)"
        assert rows[("student resnet8, static", None, batch)].realised_speedup == 1.0
        # every val-calibrated budget point says its budget, int8's as fp32's
        for precision, budgets, own in (
            ("", budget_thresholds(run[0]), result.export.deployment.threshold),
            (" int8", exported[1].budget_thresholds, int8_threshold),
        ):
            assert budgets
            for fraction, threshold in budgets.items():
                tag = rows[(f"student resnet8{precision}, early exit", threshold, batch)].tag
                assert tag == f" (budget {100 * float(fraction):g}% of full MACs)" or (
                    threshold == own
                )
    test_x, test_y = splits["test"]
    want = (quantized_logits(exported[0], test_x).argmax(-1) == test_y[:, None]).float().mean(0)
    np.testing.assert_allclose(result.per_exit_accuracy["int8"], want.numpy(), atol=1e-6)
    assert set(result.per_exit_accuracy) == {"fp32", "int8"}
    assert "| int8 |" in render_benchmark(result)
