"""`erde export --format executorch`: one ExecuTorch program whose exits are branches, run through
ExecuTorch's own Python runtime and held to the ONNX runtime and to the simulator, image by image,
on digits and on real CIFAR-10 test images. Skipped where executorch is not installed (it is the
optional extra `erde[executorch]`), except the test that its absence is one line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from erde.cli.main import main
from erde.config.schema import load_config
from erde.deploy import EarlyExitRuntime, export_run
from erde.evaluation.policy import confidence_scores, simulate
from erde.models.load import load_model
from erde.train.engine import fit

HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(
    not HAVE_EXECUTORCH, reason="executorch is not installed (pip install 'erde[executorch]')"
)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("et") / "run"
    cfg = load_config(
        "digits-student",
        ["model.name=resnet8", "train.epochs=2", "train.batch_size=128", "data.crop_padding=1"],
    )
    fit(cfg, run, progress=False)
    return run


def between(scores: torch.Tensor, low: float, high: float) -> float:
    """A threshold in the widest gap between neighbouring scores from quantile `low` to `high`:
    no image sits near it, so float rounding between runtimes cannot flip a decision."""
    s = scores.sort().values
    a, b = int(low * (len(s) - 1)), int(high * (len(s) - 1))
    k = a + int((s[a + 1 : b + 1] - s[a:b]).argmax())
    assert s[k + 1] - s[k] > 1e-4, "scores too close to split the images between exits"
    return float((s[k] + s[k + 1]) / 2)


def thresholds_for(run, x: np.ndarray) -> tuple[list[float], torch.Tensor]:
    """Per-exit thresholds that send images to every exit, from the PyTorch model's scores (the
    simulator's input), and every exit's logits."""
    model, info = load_model(run)
    d = info.data
    from erde.data.pixels import normalize_images

    images = normalize_images(torch.from_numpy(x), d.mean, d.std)
    with torch.no_grad():
        logits = torch.stack(model(images), dim=1)
    scores = confidence_scores(logits, "entropy")
    return [between(scores[:, 0], 0.2, 0.4), between(scores[:, 1], 0.4, 0.6)], logits


def parity(run, tmp_path, x: np.ndarray) -> dict:
    """ExecuTorch against ONNX Runtime (single.onnx) and the simulator, per image."""
    from erde.deploy.executorch_export import export_executorch
    from erde.deploy.executorch_runtime import ExecuTorchRuntime

    threshold, logits = thresholds_for(run, x)
    export_run(run, tmp_path / "onnx", threshold=threshold[0])
    spec = export_executorch(run, tmp_path / "et", threshold=threshold[0])
    assert [d["exit"] for d in spec["xnnpack"]] == [1, 2, 3]
    assert all(d["delegated_ops"] > 0 for d in spec["xnnpack"])  # every piece on XNNPACK
    et = ExecuTorchRuntime(tmp_path / "et").predict(x, threshold)
    ort = EarlyExitRuntime.from_export(tmp_path / "onnx", threads=1).predict(
        x, threshold, form="single"
    )
    exits, labels = simulate(logits, threshold)
    assert set(exits.tolist()) == {0, 1, 2}  # every exit answers some images
    np.testing.assert_array_equal(et.exits, ort.exits)
    np.testing.assert_array_equal(et.exits, exits.numpy() + 1)
    np.testing.assert_array_equal(et.labels, ort.labels)
    np.testing.assert_array_equal(et.labels, labels.numpy())
    np.testing.assert_allclose(et.logits, ort.logits, atol=1e-4)
    return {"images": len(x), "exits": np.bincount(et.exits).tolist()}


@needs_executorch
@pytest.mark.slow
def test_executorch_program_takes_the_exits_and_classes_of_onnx_and_simulator(digits_run, tmp_path):
    from erde.data.digits import load_digits_data

    x = load_digits_data().test_x.numpy()
    assert parity(digits_run, tmp_path, x)["images"] == 359


@pytest.fixture
def cifar_run(shared_cifar10, tmp_path):
    """A CIFAR ResNet-8 trained three epochs on 2,000 real CIFAR-10 training images (at the
    preset's lr 0.1 its first exit stays uniform, and a threshold cannot split images there)."""
    arrays = {}
    for split, n in (("train", 2000), ("test", 500)):
        with np.load(f"{shared_cifar10}/{split}.npz", allow_pickle=False) as f:
            arrays[split] = {"x": f["x"][:n], "y": f["y"][:n], "label_names": f["label_names"]}
    data = tmp_path / "cifar-subset"
    data.mkdir()
    for split, a in arrays.items():
        np.savez(data / f"{split}.npz", **a)
    cfg = load_config(
        "digits-student",
        [
            "model.name=resnet8",
            "data.source=npz",
            f"data.root={data}",
            "data.val_size=200",
            "data.crop_padding=4",
            "train.epochs=3",
            "train.warmup_epochs=0",
            "train.lr=0.02",
        ],
    )
    fit(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run", arrays["test"]["x"]


@needs_executorch
@pytest.mark.slow
def test_executorch_parity_on_real_cifar10_test_images(cifar_run, tmp_path):
    run, x = cifar_run
    assert parity(run, tmp_path, x)["images"] == 500


@needs_executorch
@pytest.mark.slow
def test_cli_export_and_infer_and_a_damaged_or_foreign_program(digits_run, tmp_path, capsys):
    """`erde export --format executorch`, `erde infer` on its folder, and every bad program as
    one line naming the file and the fix, exit status 2."""
    from PIL import Image

    out = tmp_path / "et"
    code, printed, _ = run_cli(
        capsys, "export", digits_run, "--out", out, "--format", "executorch", "--threshold", "0.5"
    )
    assert code == 0 and "early_exit.pte" in printed
    spec = json.loads((out / "executorch.json").read_text())
    assert spec["inputs"] == {"image": [1, 1, 8, 8], "thresholds": [2]}
    from erde.data.digits import load_digits_data

    data = load_digits_data()
    images = tmp_path / "images"
    images.mkdir()
    for k in range(5):
        Image.fromarray(data.test_x[k, :, :, 0].numpy(), "L").save(images / f"{k}.png")
    code, printed, _ = run_cli(capsys, "infer", out, images, "--format", "json")
    assert code == 0
    rows = json.loads(printed)
    onnx_dir = tmp_path / "onnx"
    export_run(digits_run, onnx_dir, threshold=0.5)
    _, want, _ = run_cli(capsys, "infer", onnx_dir, images, "--format", "json")
    assert [(r["class_index"], r["exit"]) for r in rows] == [
        (r["class_index"], r["exit"]) for r in json.loads(want)
    ]

    pte = out / "early_exit.pte"
    good = pte.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    pte.write_bytes(bytes(damaged))
    code, _, err = run_cli(capsys, "infer", out, images)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(pte) in err and "does not match the checksum" in err and "--format executorch" in err

    # bytes that are no program, with the checksum made to match: ExecuTorch's refusal, one line
    from erde.files import sha256_bytes

    def plant(blob: bytes) -> None:
        pte.write_bytes(blob)
        spec["sha256"] = sha256_bytes(blob)
        (out / "executorch.json").write_text(json.dumps(spec))

    plant(good[: len(good) // 2])
    code, _, err = run_cli(capsys, "infer", out, images)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ExecuTorch cannot load" in err and str(pte) in err

    # the program of another model (3 classes) under this model's spec and a matching checksum
    from erde.deploy.executorch_export import branch_program
    from erde.models.registry import create_model

    _, info = load_model(digits_run)
    other = create_model("resnet8", num_classes=3, in_channels=1, input_size=8).eval()
    plant(branch_program(other, info, "entropy", False)[0])
    code, _, err = run_cli(capsys, "infer", out, images)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the program of another model" in err and str(pte) in err and "[1, 3]" in err

    # an earlier ExecuTorch export is replaced; a folder with other files is refused
    code, _, _ = run_cli(capsys, "export", digits_run, "--out", out, "--format", "executorch",
                         "--threshold", "0.5")  # fmt: skip
    assert code == 0 and pte.read_bytes() == good

    # `erde bench` times the program beside the ONNX export of the same weights, not another's
    # --threads 0: the thread pool as it is (resizing it is refused once programs are loaded)
    bench = ["bench", onnx_dir, "--executorch", out, "--batch", "1", "--repeats", "3"]
    bench += ["--threads", "0"]
    code, printed, _ = run_cli(capsys, *bench, "--warmup", "0", "--thresholds", "0,10")
    rows = [line for line in printed.splitlines() if "ExecuTorch early exit" in line]
    # the export's own threshold (0.5) is always timed too
    assert code == 0 and [r.split("|")[2].strip() for r in rows] == ["0", "0.5", "10"]
    assert "0.00 / 0.00 / 1.00" in rows[0] and "1.00 / 0.00 / 0.00" in rows[2]
    spec = json.loads((out / "executorch.json").read_text())
    (out / "executorch.json").write_text(json.dumps({**spec, "weights_sha256": "0" * 64}))
    code, _, err = run_cli(capsys, *bench, "--warmup", "0", "--thresholds", "0")
    assert code == 2 and "exported from other weights" in err and str(out) in err
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(
        capsys, "export", digits_run, "--out", out, "--format", "executorch", "--threshold", "0"
    )
    assert code == 2 and "notes.txt" in err
    shutil.rmtree(out)
    code, _, err = run_cli(
        capsys, "export", digits_run, "--out", out, "--format", "executorch", "--int8"
    )
    assert code == 2 and "--int8 is for ONNX exports" in err


@needs_executorch
@pytest.mark.slow
def test_a_model_executorch_cannot_build_is_one_line(tmp_path, capsys):
    """MobileNetV3's pieces keep tensor constants off XNNPACK, and `to_edge` cannot trace them
    inside the branch (executorch 1.5.1): one line naming the model and the ONNX way out, and no
    export folder. (A later ExecuTorch that builds it fails this test: then update the README.)"""
    rng = np.random.default_rng(0)
    data = tmp_path / "rgb"
    data.mkdir()
    for split, n in (("train", 60), ("test", 20)):  # any RGB images do: the export fails first
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(data / f"{split}.npz", x=x, y=np.arange(n) % 3, label_names=["a", "b", "c"])
    run = tmp_path / "run"
    model = ["model.name=torchvision/mobilenet_v3_small", "data.source=npz", f"data.root={data}"]
    train = ["data.val_size=12", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16"]
    cfg = load_config("digits-student", [*model, *train])
    fit(cfg, run, progress=False)
    out = tmp_path / "et"
    code, _, err = run_cli(
        capsys, "export", run, "--out", out, "--format", "executorch", "--threshold", "0.5"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot build the early-exit branch of torchvision/mobilenet_v3_small" in err
    assert "--format onnx" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(HAVE_EXECUTORCH, reason="executorch is installed here")
def test_executorch_format_without_executorch_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "export", tmp_path / "run", "--out", tmp_path / "et", "--format", "executorch"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'erde[executorch]'" in err
