"""Static int8 graphs for CPUs with integer dot products, and the threshold they need.

Each fp32 graph (every piece and the static network) is quantized by ONNX Runtime's static
quantizer: QDQ format, per-channel int8 weights, uint8 activations (the x86 pairing ONNX Runtime
recommends; AVX512-VNNI and AVX-VNNI run it natively), MinMax ranges observed on the run's
validation images (the first `CALIBRATION_IMAGES`). `quant_pre_process` first folds BatchNorm into
the convolutions. The exit-score nodes (everything computed from an exit's logits) stay float32:
the score decides the exit, so it keeps the simulator's formula and precision, applied to the
quantized logits. So do convolutions with fewer than `MIN_INT8_CHANNELS` input channels (the stem
on the image): int8 kernels gain nothing on 1-3 channels, while quantizing the image and turning
it to ONNX Runtime's int8 layout costs more than the float convolution (docs/benchmarks.md,
"Batch-1 fixed cost": static int8 went from 1.45x to 1.58x the speed of fp32 at batch 1).

Quantization moves the logits and hence the entropies, so the threshold calibrated on the fp32
model would give another operating point. It is re-chosen on the quantized pieces' own
validation outputs by `erde.evaluation.summary.summarize`, the calibration `erde evaluate` runs,
with the same criterion (reference accuracy and allowed drop, or MACs budget) as the run's report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from erde.config.schema import load_config
from erde.data.pixels import normalize_images
from erde.data.prepare import prepare_data
from erde.deploy.curve import frontier
from erde.deploy.manifest import Deployment
from erde.deploy.runtime import ort_piece, ort_session
from erde.deploy.torch_backend import exit_logits
from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache
from erde.evaluation.summary import summarize
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo
from erde.run.report import Report, read_current_report

# MinMax ranges come from the first images of the val split (a random hold-out): the calibrator
# keeps every intermediate tensor of every image until the end (its option to flush early drops
# the data in onnxruntime 1.32), so the count bounds memory: about 1 GB for a CIFAR ResNet-8.
CALIBRATION_IMAGES = 1000
CALIBRATION_BATCH = 100
MIN_INT8_CHANNELS = 8  # fewer input channels: the convolution stays float32 (the stem)
# The backbones' operators. Left out: BatchNormalization and AveragePool, which occur only in the
# exit heads (the backbones' BatchNorms fold into convolutions): ONNX Runtime has no fused int8
# BatchNorm, and its int8 average pool costs more than the float one on a head's small map.
QUANTIZED_OPS = [
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "Clip",
    "MaxPool",
    "Slice",
    "Pad",
    "Concat",
    "Reshape",
    "Flatten",
    "Transpose",
]


@dataclass
class Quantized:
    """The int8 graphs, the deployment re-chosen on them, and what to record about it."""

    pieces: list[onnx.ModelProto]
    static: onnx.ModelProto
    point: Deployment
    budget_thresholds: dict[str, float]
    record: dict  # the manifest's `quantization` entry
    val_curve: dict  # the int8 pieces' own val curve (`erde.deploy.curve.frontier`)


class _Batches:
    """`onnxruntime.quantization.CalibrationDataReader`: the inputs one graph sees, in batches."""

    def __init__(self, name: str, x: torch.Tensor) -> None:
        self.feeds = iter(
            {name: x[s : s + CALIBRATION_BATCH].numpy()}
            for s in range(0, len(x), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def _float_convs(graph: onnx.GraphProto) -> list[str]:
    """Names of the convolutions with fewer than `MIN_INT8_CHANNELS` input channels."""
    weights = {t.name: t.dims for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if weights[node.input[1]][1] * group < MIN_INT8_CHANNELS:
                names.append(node.name)
    return names


def _score_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes computed from a logits output (the exit score), kept in float32."""
    logits = {o.name for o in graph.output if o.name.startswith("logits")}
    if len(graph.output) == 1:
        return []
    reached, names = set(logits), []
    for node in graph.node:  # ONNX nodes are in topological order
        if reached.intersection(node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


def quantize_graph(proto: onnx.ModelProto, inputs: torch.Tensor) -> onnx.ModelProto:
    """One fp32 graph as QDQ int8, calibrated on `inputs` (what its input sees on val)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="erde-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(proto, str(pre))
        model = onnx.load(str(pre))
        for k, node in enumerate(model.graph.node):
            node.name = node.name or f"node{k}"  # nodes_to_exclude needs names
        quantize_static(
            model,
            str(out),
            _Batches(model.graph.input[0].name, inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=_score_nodes(model.graph) + _float_convs(model.graph),
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    return quantized


def _splits(run_dir: Path, info: ModelInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The run's val and test images, normalised as in training, and their labels."""
    split = prepare_data(load_config(str(RunDir(run_dir).config), recorded=True))
    d = info.data
    return {
        name: (normalize_images(x, d.mean, d.std), y)
        for name, (x, y) in (("val", split.val), ("test", split.test))
    }


def _criterion(report: Report | None) -> tuple[float, float | None]:
    """(allowed drop in points, MACs budget fraction or None) of the report's chosen point."""
    if report is None or report.chosen == report.at_reference_accuracy:
        return (report.max_drop_points if report else 0.0), None
    for fraction, point in report.at_budget_fraction.items():
        if point == report.chosen:
            return report.max_drop_points, float(fraction)
    raise ErdeError(
        f"the threshold of {report.run} was chosen for a MACs budget erde cannot re-apply to the "
        "int8 model; give the threshold (--threshold), or evaluate with a default budget"
    )


def quantize_export(
    run_dir: Path,
    info: ModelInfo,
    pieces: list[onnx.ModelProto],
    static: onnx.ModelProto,
    point: Deployment,
    weights_sha256: str | None = None,
) -> Quantized:
    """Every graph as int8, and the deployment re-chosen on the int8 pieces' val outputs (a
    given threshold is kept: the user chose it)."""
    import onnxruntime

    data = _splits(run_dir, info)
    val_x = data["val"][0]
    fp32 = [ort_piece(ort_session(p.SerializeToString())) for p in pieces]
    q_pieces, x = [], val_x[:CALIBRATION_IMAGES]
    for k, proto in enumerate(pieces):
        q_pieces.append(quantize_graph(proto, x))
        if k < len(pieces) - 1:  # the next piece is calibrated on this one's fp32 features
            x = torch.cat(
                [torch.from_numpy(fp32[k](x[s : s + 256])[0]) for s in range(0, len(x), 256)]
            )
    q_static = quantize_graph(static, val_x[:CALIBRATION_IMAGES])
    int8 = [ort_piece(ort_session(p.SerializeToString())) for p in q_pieces]
    logits = {name: exit_logits(int8, x) for name, (x, _) in data.items()}
    cache = LogitsCache(logits, {k: y for k, (_, y) in data.items()}, list(info.exit_macs), "")
    report = read_current_report(run_dir, weights_sha256)
    max_drop, budget = _criterion(report)
    summarized = summarize(
        cache,
        info,
        str(run_dir),
        policy=point.policy,
        normalize=point.normalize,
        reference=report.reference if report else None,
        max_drop=max_drop,
        budget=budget,
    )
    summary = summarized.report
    if point.threshold_source == "given":
        new = point
    else:
        new = Deployment(
            summary.chosen.threshold,
            point.policy,
            point.normalize,
            f"re-calibrated on the int8 model's val outputs ({summary.chosen.criterion})",
        )
    budgets = {k: p.threshold for k, p in summary.at_budget_fraction.items() if p is not None}
    record = {
        "tool": f"onnxruntime.quantization.quantize_static, onnxruntime {onnxruntime.__version__}",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8, per tensor (MinMax)",
        "float32": f"exit scores, convolutions with < {MIN_INT8_CHANNELS} input channels",
        "calibration_images": f"the first {min(len(val_x), CALIBRATION_IMAGES)} validation "
        f"images of {run_dir}",
        "per_exit_accuracy": summary.per_exit_accuracy,
        "fp32_threshold": point.threshold,
    }
    curve = frontier(summarized.val_curve, len(data["val"][1]))
    return Quantized(q_pieces, q_static, new, budgets, record, curve)
