"""`erde infer --format table|json|csv`, its warnings for drastically converted files, and the
bench notes: outputs parsed with json/csv and checked against the Python runtime's predictions on
images decoded and normalised here by hand with Pillow and numpy."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from erde.cli.deploy import INFER_FIELDS, bench_notes
from erde.cli.main import main
from erde.deploy import EarlyExitRuntime, export_run
from erde.deploy.early_exit_model import EarlyExitModel
from erde.deploy.images import load_image, read_image
from erde.deploy.latency import Benchmark, BenchRow, render_benchmark
from erde.deploy.manifest import Deployment, Manifest
from erde.run.model_info import DataInfo, ModelInfo


def save(path, pixels, mode=None):
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.mark.parametrize(
    "shape, channels, size, want",
    [
        ((480, 640, 3), 1, 8, ["colour converted to grey", "resized from 640x480 to 8x8"]),
        ((8, 8, 3), 1, 8, ["colour converted to grey"]),
        ((8, 8, 3), 3, 8, []),  # a colour model keeps the colours
        ((16, 16), 1, 8, []),  # halved: within the factor 2
        ((16, 17), 1, 8, ["resized from 17x16 to 8x8"]),  # H x W: 17 wide
        ((32, 32, 3), 3, 224, ["resized from 32x32 to 224x224"]),  # enlarged 7x
        ((150, 120, 3), 3, 224, []),
    ],
)
def test_read_image_warns_only_when_the_conversion_is_drastic(
    tmp_path, shape, channels, size, want
):
    rng = np.random.default_rng(0)
    path = save(tmp_path / "image.png", rng.integers(0, 256, shape, dtype=np.uint8))
    pixels, warning = read_image(path, channels, size)
    assert np.array_equal(pixels, load_image(path, channels, size))
    if not want:
        assert warning is None
    else:
        assert warning.startswith(f"{path}: ") and "\n" not in warning
        assert "may be meaningless" in warning
        assert all(w in warning for w in want)
        assert ("colour converted" in warning) == ("colour converted to grey" in want)


def test_grey_stored_as_colour_is_not_called_colour(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = save(tmp_path / "grey.png", np.repeat(grey[..., None], 3, axis=2))
    palette = Image.fromarray(grey).convert("P")  # a palette of greys
    palette.save(tmp_path / "palette.png")
    coloured = Image.fromarray(np.stack([grey, grey, 255 - grey], axis=2)).convert("P")
    coloured.save(tmp_path / "coloured.png")
    assert read_image(rgb, 1, 8)[1] is None
    assert read_image(tmp_path / "palette.png", 1, 8)[1] is None
    assert "colour converted to grey" in read_image(tmp_path / "coloured.png", 1, 8)[1]


def test_bench_notes_count_the_images_of_every_row():
    def row(batch):
        return BenchRow("student", None, batch, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

    data = DataInfo("digits", ["0", "1"], [0.5], [0.25], 8, 1)
    export = Manifest(
        info=ModelInfo({"name": "student"}, [10, 20], 18, data),
        deployment=Deployment(0.5, "entropy", False, "given"),
        pieces=[],
        static={},
        single={},
        precision="fp32",
        budget_thresholds={},
        quantization=None,
        opset=18,
        exporter="",
        source_run="runs/student",
        weights_sha256="",
    )
    result = Benchmark(
        rows=[row(1), row(1), row(64)],
        per_exit_accuracy={"fp32": [0.5, 1.0]},
        export=export,
        reference=None,
        threads=1,
        repeats=100,
        warmup=1,
        form="auto",
        held_out_images=360,
    )
    notes = bench_notes(result)
    assert "100 at batch 1, 6,400 at batch 64 (100 timed batches x batch size)" in notes
    assert "the 360 test images are taken again from the start" in notes
    assert "fixed cost" in notes and "head" in notes
    assert "taken again" not in bench_notes(dataclasses.replace(result, held_out_images=10_000))
    table = render_benchmark(result)  # what the export and the settings say, read from them
    assert table.startswith("student on digits test images, policy entropy; ONNX Runtime CPU, 1 ")
    assert "| export | exit 1 | exit 2 |" in table and "| fp32 | 50.00 | 100.00 |" in table


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "export"
    export_run(teacher, out, threshold=1.0)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Digits as grey PNGs, a colour photo, a grey digit stored as RGB, a 20x20 grey digit and
    a broken file."""
    folder = tmp_path_factory.mktemp("images")
    digits = (load_digits().images[:6] * 255 / 16).round().astype(np.uint8)
    paths = [save(folder / f"digit{k}.png", d) for k, d in enumerate(digits[:4])]
    rng = np.random.default_rng(1)
    paths.append(save(folder / "photo.jpg", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    paths.append(save(folder / "grey-rgb.png", np.repeat(digits[4][..., None], 3, axis=2)))
    paths.append(save(folder / "big.png", np.kron(digits[5], np.ones((5, 5), np.uint8))[:20, :20]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    paths.append(folder / "broken.png")
    return paths


def by_hand(path, mean, std, size):
    """Pillow's grey conversion, the shorter side resized to `size` (bilinear; the longer to
    floor(size * longer / shorter)) and the centre cut out, then (x / 255 - mean) / std."""
    img = Image.open(path).convert("L")
    width, height = img.size
    if min(width, height) != size:
        short = min(width, height)
        width, height = size * width // short, size * height // short
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float64) / 255
    return ((x - mean[0]) / std[0]).astype(np.float32)[None]


@pytest.fixture(scope="module")
def expected(exported, files):
    """The Python runtime's predictions on the readable files, at a threshold that sends the
    images out at different exits."""
    rt = EarlyExitRuntime.from_export(exported, threads=1)
    d = rt.info.data
    x = np.stack([by_hand(p, d.mean, d.std, d.input_size) for p in files[:-1]])
    _, _, scores = rt.pieces[0](x)
    middle = np.sort(scores)[len(x) // 2 - 1 : len(x) // 2 + 1]
    threshold = float(middle.mean())  # between two scores: no image sits on the threshold
    pred = rt.predict(x, threshold)
    assert len(set(pred.exits.tolist())) >= 2, pred.exits  # exits 1-based: 1..3
    assert set(pred.exits.tolist()) <= {1, 2, 3}
    return rt, threshold, pred


def infer(capsys, exported, files, threshold, *options):
    code = main(["infer", str(exported), *map(str, files), "--threshold", repr(threshold),
                 "--threads", "1", *options])  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_rows(rows, files, rt, pred):
    assert [r["file"] for r in rows] == [str(p) for p in files]
    for k, r in enumerate(rows[:-1]):
        assert r["error"] is None
        assert r["class_index"] == int(pred.labels[k])
        assert r["class_name"] == rt.classes[int(pred.labels[k])]
        assert r["exit"] == int(pred.exits[k])
        assert r["confidence"] == pytest.approx(float(pred.confidence[k]), abs=1e-5)
    broken = rows[-1]
    assert "broken.png" in broken["error"] and "cannot decode" in broken["error"]
    assert broken["class_index"] is broken["exit"] is broken["confidence"] is None


@pytest.mark.slow
def test_infer_json_matches_the_python_runtime(capsys, exported, files, expected):
    rt, threshold, pred = expected
    code, out, err = infer(capsys, exported, files, threshold, "--format", "json")
    assert code == 2  # the broken file: reported after every other file was answered
    rows = json.loads(out)
    assert all(list(r) == list(INFER_FIELDS) for r in rows)
    check_rows(rows, files, rt, pred)
    warned = {r["file"]: r["warning"] for r in rows if r["warning"] is not None}
    assert set(warned) == {str(files[4]), str(files[6])}  # the photo and the 20x20 digit
    assert "colour converted to grey and resized from 640x480 to 8x8" in warned[str(files[4])]
    assert "resized from 20x20 to 8x8" in warned[str(files[6])]
    lines = err.strip().splitlines()
    assert lines[:-1] == [f"erde infer: warning: {warned[str(p)]}" for p in (files[4], files[6])]
    assert lines[-1].startswith("erde infer: error: 1 of 8 image(s) could not be classified")


@pytest.mark.slow
def test_infer_csv_matches_the_python_runtime(capsys, exported, files, expected):
    rt, threshold, pred = expected
    code, out, _ = infer(capsys, exported, files, threshold, "--format", "csv")
    assert code == 2
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(out.splitlines()) == 1 + len(files)  # a header row and one row per file

    def typed(r):
        number = {"class_index": int, "exit": int, "confidence": float}
        return {k: (number.get(k, str)(v) if v != "" else None) for k, v in r.items()}

    rows = [typed(r) for r in table]
    check_rows(rows, files, rt, pred)
    assert [r["warning"] is not None for r in rows] == [k in (4, 6) for k in range(len(files))]


@pytest.mark.slow
def test_infer_table_is_the_default_and_unchanged(capsys, exported, files, expected):
    rt, threshold, pred = expected
    code, out, _ = infer(capsys, exported, files[:4], threshold)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "| file | class | exit | confidence |"
    for k, line in enumerate(lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(files[k])
        assert cells[1] == rt.classes[int(pred.labels[k])]
        assert int(cells[2]) == int(pred.exits[k])
        assert float(cells[3]) == pytest.approx(float(pred.confidence[k]), abs=1e-4)


@pytest.mark.slow
def test_predict_files_warns_as_infer_does(teacher, files):
    model = EarlyExitModel.from_pretrained(teacher)
    with pytest.warns(UserWarning, match="colour converted to grey and resized from 640x480"):
        result = model.predict_files([files[0], files[4]])
    assert len(result.classes) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_infer_prints_a_name_that_is_no_utf8_on_a_strict_utf8_stdout(exported, files, fmt):
    """A file name holding the byte 0xff is shown as \\xff rather than crashing the output."""
    folder = os.fsencode(files[0].parent)
    odd = os.path.join(folder, b"caf\xff.png")
    shutil.copyfile(os.fsencode(files[0]), odd)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-m", "erde", "infer", str(exported), odd, "--format", fmt],
        capture_output=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = done.stdout.decode("utf-8")  # strict: valid UTF-8
    assert "caf\\xff.png" in (json.loads(out)[0]["file"] if fmt == "json" else out)
