"""The export describes itself: an engineer with only the folder (manifest.json, DEPLOY.md)
feeds the graphs as evaluation fed the model and gets `erde infer`'s answers.

- The crop rule (`erde.data.decode.resize_crop`), against torchvision's resize and centre crop
  that streamed evaluation used before, and pixel by pixel where no resampling happens.
- tests/plain_runtime.py, which imports only json, numpy, Pillow and ONNX Runtime, drives the
  pieces and single.onnx from the manifest in a subprocess; its classes and exits are `erde
  infer`'s, on digits and on real CIFAR-10 test images (skipped without ../shared), square and
  not.
- DEPLOY.md holds no number the manifest does not; the val curve gives, for every budget, the
  threshold `erde evaluate`'s calibration picks on the full val sweep.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erde.cli.main import main
from erde.config.schema import load_config
from erde.data.decode import decode_image, normalize_array, resize_crop
from erde.data.prepare import prepare_data
from erde.deploy import export_run
from erde.deploy.curve import choose_threshold
from erde.deploy.deploy_md import deploy_md
from erde.deploy.images import load_image
from erde.deploy.manifest import read_manifest
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.calibrate import calibrate_for_budget
from erde.evaluation.policy import confidence_scores
from erde.evaluation.runs import evaluate_run
from erde.evaluation.sweep import Curve
from erde.models.load import load_model
from erde.run.report import read_report
from erde.train.engine import fit

PLAIN = Path(__file__).parent / "plain_runtime.py"


def test_the_crop_rule_cuts_the_centre_of_the_resized_shorter_side():
    # No resampling (the shorter side is already the size): exactly columns 8..15 of 24.
    wide = np.tile(np.arange(24, dtype=np.uint8) * 10, (8, 1))[..., None]
    assert np.array_equal(resize_crop(wide, 8), wide[:, 8:16])
    tall = wide.transpose(1, 0, 2)
    assert np.array_equal(resize_crop(tall, 8), tall[8:16])
    square = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert np.array_equal(resize_crop(square, 8), square)  # at size and crop 1: the identity
    # 640 x 480 at 224 / 0.875: resized to 341 x 256 (floor), cut at (58, 16): as torchvision's
    # Resize(256, antialias=True) + CenterCrop(224), up to its uint8 rounding.
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    smooth = np.asarray(
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((640, 480))
    )
    ours = resize_crop(smooth, 224, 0.875)
    theirs = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(
        torch.from_numpy(smooth.copy()).permute(2, 0, 1)
    )
    assert ours.shape == (224, 224, 3)
    diff = np.abs(ours.astype(int) - theirs.permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5


def test_a_file_is_decoded_then_brought_to_size_by_the_rule(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    whole = decode_image(tmp_path / "a.png", 3)
    assert np.array_equal(decode_image(tmp_path / "a.png", 3, 16), resize_crop(whole, 16))
    assert np.array_equal(decode_image(tmp_path / "a.png", 3, 16, 0.5), resize_crop(whole, 16, 0.5))


def save_images(folder: Path, pixels: np.ndarray, odd: tuple[int, int]) -> list[str]:
    """uint8 N x H x W x C images as PNG files; every fourth stretched to `odd` (W, H), so the
    resize and the centre crop have work to do."""
    folder.mkdir()
    paths = []
    for k, image in enumerate(pixels):
        img = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        if k % 4 == 3:
            img = img.resize(odd, Image.Resampling.BICUBIC)
        paths.append(str(folder / f"image{k:03d}.png"))
        img.save(paths[-1])
    return paths


def middle_threshold(run: Path, paths: list[str]) -> float:
    """The median first-exit score of the image files, so that their exits differ."""
    model, info = load_model(run)
    d = info.data
    pixels = np.stack([load_image(p, d.in_channels, d.input_size, d.eval_crop) for p in paths])
    with torch.no_grad():
        logits = torch.stack(model(torch.from_numpy(normalize_array(pixels, d.mean, d.std))), 1)
    return float(confidence_scores(logits)[:, 0].median())


def exported(
    root: Path, overrides: list[str], preset: str, images: np.ndarray | None, odd: tuple[int, int]
) -> tuple[Path, Path, list[str]]:
    """A trained and evaluated run, `images` (default: its first test images) as files, and the
    run exported with a threshold that sends them to different exits."""
    fit(load_config(preset, overrides), root / "run", progress=False)
    evaluate_run(root / "run", device="cpu")
    if images is None:
        split = prepare_data(load_config(str(root / "run" / "config.yaml")))
        images = split.data.test_x[:32].numpy()
    paths = save_images(root / "images", images, odd)
    export_run(root / "run", root / "export", threshold=middle_threshold(root / "run", paths))
    return root / "run", root / "export", paths


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-digits")
    overrides = ["model.name=resnet8", "train.epochs=2", "train.warmup_epochs=0"]
    return exported(root, overrides, "digits-student", None, (13, 10))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A one-epoch ResNet-8 on 2000 real CIFAR-10 training images, exported, and 48 real test
    images it never saw (those of the shared copy; skipped without it)."""
    from conftest import SHARED_CIFAR10

    shared = Path(SHARED_CIFAR10).resolve()
    if not (shared / "test.npz").is_file():
        pytest.skip("../shared/data/cifar10 is not present")
    root = tmp_path_factory.mktemp("spec-cifar")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 2000), ("test", 200)):
        with np.load(shared / f"{split}.npz", allow_pickle=False) as f:
            np.savez(data / f"{split}.npz", x=f["x"][:n], y=f["y"][:n])
    overrides = [
        "data.source=npz", f"data.root={data}", "model.name=resnet8", "train.epochs=1",
        "train.warmup_epochs=0", "train.batch_size=100", "train.lr=0.05", "data.crop_padding=4",
    ]  # fmt: skip
    with np.load(shared / "test.npz", allow_pickle=False) as f:
        images = f["x"][1000:1048]
    return exported(root, overrides, "digits-teacher", images, (45, 38))


def plain_answers(export: Path, paths: list[str]) -> dict:
    """tests/plain_runtime.py in a fresh interpreter, which checks that it loaded no erde."""
    out = subprocess.run(
        [sys.executable, "-I", str(PLAIN), str(export), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    return {form: [tuple(a) for a in answers] for form, answers in json.loads(out.stdout).items()}


def infer_answers(export: Path, paths: list[str], form: str, capsys) -> list[tuple[str, int]]:
    assert main(["infer", str(export), *paths, "--format", "json", "--form", form]) == 0
    return [(r["class_name"], r["exit"]) for r in json.loads(capsys.readouterr().out)]


def check_plain_runtime(export: Path, paths: list[str], capsys) -> None:
    plain = plain_answers(export, paths)
    for form in ("split", "single"):
        assert plain[form] == infer_answers(export, paths, form, capsys)
    assert plain["split"] == plain["single"]
    exits = {e for _, e in plain["split"]}
    assert len(exits) > 1, exits  # the threshold sends images to more than one exit


@pytest.mark.slow
def test_the_export_alone_gives_erde_infers_answers_on_digits(digits, capsys):
    _, export, paths = digits
    check_plain_runtime(export, paths, capsys)


@pytest.mark.slow
def test_the_export_alone_gives_erde_infers_answers_on_real_cifar10(cifar, capsys):
    _, export, paths = cifar
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["preprocess"]["channels"] == "RGB"
    check_plain_runtime(export, paths, capsys)


def numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)


def manifest_numbers(value: object) -> list[float]:
    """Every number the manifest states: its numeric values and those written in its texts,
    checksums aside."""
    found: list[float] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("sha256", "weights_sha256"):
                found += manifest_numbers(item)
    elif isinstance(value, list):
        for item in value:
            found += manifest_numbers(item)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        found.append(float(value))
    elif isinstance(value, str):
        found += [float(n) for n in numbers(value)]
    return found


@pytest.mark.slow
def test_deploy_md_states_only_the_manifests_numbers(digits):
    _, export, _ = digits
    manifest = json.loads((export / "manifest.json").read_text())
    text = (export / "DEPLOY.md").read_text()
    assert text == deploy_md(manifest)
    stated = manifest_numbers(manifest)
    for token in numbers(text):
        value = float(token)
        assert any(math.isclose(value, v, rel_tol=5e-6, abs_tol=0) for v in stated), token
    e = manifest["exits"]
    assert f"{e['threshold']:.6g}" in text and str(e["macs"][0]) in text
    # Another manifest, another text: the numbers are read, not written in.
    edited = {**manifest, "exits": {**e, "threshold": 0.123456, "static_macs": 98765}}
    other = deploy_md(edited)
    assert "0.123456" in other and "98765" in other and "0.123456" not in text


def full_val_curve(run: Path) -> Curve:
    """`erde evaluate`'s own val sweep, from its CSV file."""
    with (run / "eval" / "curve_val.csv").open() as f:
        rows = list(csv.DictReader(f))
    shares = sorted(k for k in rows[0] if k.endswith("_share"))
    column = lambda key: np.array([float(r[key]) for r in rows])  # noqa: E731
    return Curve(
        thresholds=column("threshold"),
        accuracy=column("accuracy"),
        expected_macs=column("expected_macs"),
        exit_share=np.stack([column(k) for k in shares], axis=1),
        exit_macs=np.array(json.loads((run / "model.json").read_text())["exit_macs"], float),
    )


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["digits", "cifar"])
def test_the_val_curve_picks_the_evaluations_threshold_for_every_budget(fixture, request):
    run, export, _ = request.getfixturevalue(fixture)
    manifest = read_manifest(export)
    curve, report = full_val_curve(run), read_report(run / "eval" / "report.json")
    assert manifest.val_curve["images"] == len(load_cache(run).labels["val"])
    macs = manifest.info.exit_macs
    for budget in np.linspace(macs[0], macs[-1], 41):
        want = calibrate_for_budget(curve, float(budget))
        got = choose_threshold(manifest, float(budget))
        assert (got["threshold"], got["val_accuracy"]) == (want.threshold, want.val_accuracy)
        assert got["expected_macs"] == pytest.approx(want.val_expected_macs, rel=1e-12)
    for fraction, point in report.at_budget_fraction.items():
        if point is not None:
            assert choose_threshold(manifest, float(fraction))["threshold"] == point.threshold


@pytest.mark.slow
def test_a_budget_the_model_cannot_spend_is_refused(digits):
    _, export, _ = digits
    manifest = read_manifest(export)
    macs = manifest.info.exit_macs
    with pytest.raises(ErdeError, match=f"below the first exit's cost \\({macs[0]} MACs\\)"):
        choose_threshold(manifest, macs[0] - 1)
    with pytest.raises(ErdeError, match=f"above the full model's {macs[-1]} MACs"):
        choose_threshold(manifest, macs[-1] + 1)
    with pytest.raises(ErdeError, match="must be a positive number"):
        choose_threshold(manifest, 0)
