"""Library networks through export and the runtime: a timm CNN and a timm ViT, trained
briefly on small images, exported to ONNX and run by ONNX Runtime, give the exits and classes of
the PyTorch model as the simulator decides them, from arrays and from image files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from erde.config.schema import load_config
from erde.data import DeviceBatches
from erde.data.prepare import prepare_data
from erde.deploy import EarlyExitRuntime, export_run
from erde.evaluation.policy import confidence_scores, simulate
from erde.models.load import load_model
from erde.train.engine import fit

pytest.importorskip("timm")
pytest.importorskip("onnxscript")

# A ResNet and a VisionTransformer of timm (the classes erde cuts), at 32 x 32 pixels.
MODELS = ("timm/test_resnet", "timm/test_vit")
TIE = 1e-5  # scores this close to a threshold may fall either way between ORT and PyTorch
LOGITS_ATOL = 1e-4  # ONNX Runtime vs PyTorch, float32


def gap_threshold(scores: torch.Tensor) -> float:
    """The middle of the widest gap between the sorted scores from their 20th to 80th percentile."""
    s = scores.flatten().double().sort().values
    lo, hi = int(0.2 * len(s)), int(0.8 * len(s))
    i = lo + int((s[lo + 1 : hi + 1] - s[lo:hi]).argmax())
    return float((s[i] + s[i + 1]) / 2)


@pytest.fixture(scope="module", params=MODELS)
def run(request, tmp_path_factory):
    """A 3-epoch run of the model on 32 x 32 images of 4 classes (a colour each, plus noise), so
    that its exits grow unequally sure and the exit scores spread out."""
    base = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]])
    for split, n in (("train", 48), ("test", 40)):
        y = np.arange(n) % 4
        noisy = colours[y][:, None, None, :] + rng.normal(0, 60, (n, 32, 32, 3))
        np.savez(base / f"{split}.npz", x=noisy.clip(0, 255).astype(np.uint8), y=y)
    overrides = [
        "data.source=npz", f"data.root={base}", f"model.name={request.param}", "data.val_size=8",
        "train.epochs=3", "train.batch_size=16", "train.warmup_epochs=0", "train.lr=0.05",
        "data.crop_padding=2",
    ]  # fmt: skip
    fit(load_config("digits-teacher", overrides), base / "run", progress=False)
    return base / "run"


@pytest.fixture(scope="module")
def images(run):
    """The run's test images as stored (uint8 NHWC) and normalised as in evaluation."""
    split = prepare_data(load_config(str(run / "config.yaml")))
    raw, y = split.test
    batches = DeviceBatches(raw, y, batch_size=len(y), mean=split.data.mean, std=split.data.std)
    return raw, next(iter(batches))[0]


@pytest.mark.slow
def test_exported_library_model_exits_where_the_simulator_says(run, images, tmp_path):
    raw, x = images
    model, info = load_model(run)
    assert info.config["model"]["name"] in MODELS
    with torch.no_grad():
        torch_logits = torch.stack(model(x), dim=1)  # N x E x K
    n, exits = torch_logits.shape[:2]
    assert exits >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported exporter, nothing to silence
        export_run(run, tmp_path / "export", threshold=0.5)
    rt = EarlyExitRuntime.from_export(tmp_path / "export", threads=1)
    assert rt.num_exits == exits

    scores = confidence_scores(torch_logits, "entropy")
    # Thresholds that send images out at several exits, in wide gaps between the scores: a
    # score within float rounding of its threshold may fall either way between ONNX Runtime and
    # PyTorch.
    one = gap_threshold(scores[:, 0])
    per_exit, undecided = [], torch.ones(n, dtype=torch.bool)
    for i in range(exits - 1):  # each exit's threshold splits the images that reach it
        per_exit.append(gap_threshold(scores[undecided, i]) if undecided.sum() >= 5 else 0.0)
        undecided &= scores[:, i] >= per_exit[-1]
    for threshold, least in ((one, 2), (per_exit, 3)):  # images leave at >= `least` exits
        exit_index, prediction = simulate(torch_logits, threshold)
        assert len(set(exit_index.tolist())) >= least
        cut = torch.tensor(threshold).expand(exits - 1)
        reached = torch.arange(exits - 1)[None, :] <= exit_index[:, None]
        tie = (((scores[:, :-1] - cut).abs() < TIE) & reached).any(dim=1).numpy()
        assert tie.sum() <= 2
        for form in ("split", "single"):
            pred = rt.predict(x, threshold, form=form)
            same = pred.exits == exit_index.numpy() + 1  # simulate's exits are 0-based
            assert np.all(same | tie), f"{form}: {(~same & ~tie).sum()} of {n} exits differ"
            assert np.all((pred.labels == prediction.numpy()) | tie)
            want = torch_logits[torch.arange(n), exit_index].numpy()
            np.testing.assert_allclose(pred.logits[same], want[same], atol=LOGITS_ATOL, rtol=0)

    # Image files (what `erde infer` reads): PNG is lossless, so the same input and answers.
    rt = rt.with_threshold(one)
    paths = []
    for k in range(6):
        paths.append(tmp_path / f"image{k}.png")
        Image.fromarray(raw[k].numpy()).save(paths[-1])
    rows = rt.classify_files(paths, batch_size=4)
    want = rt.predict(x[:6])
    assert [r.error for r in rows] == [None] * 6
    assert [r.exit for r in rows] == want.exits.tolist()
    assert [r.class_name for r in rows] == [rt.classes[c] for c in want.labels]
