"""Image folders streamed from their files: the choice against the memory budget, the same
batches and evaluation as the device-resident path, resume, training end to end, the teacher
cache turned off, one-line errors, the config keys and the ImageNet preset."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from erde.config.schema import load_config, load_reproduce_config, stage_config, to_yaml
from erde.data import DeviceBatches, load_source
from erde.data.budget import decoded_bytes
from erde.data.image_folder import folder_samples
from erde.data.prepare import data_info, eval_batches, prepare_data
from erde.data.stream import StreamBatches
from erde.errors import ErdeError
from erde.models import create_model
from erde.models.build import build_model
from erde.run.metrics import read_jsonl
from erde.study.reproduce import check_study
from erde.train.engine import fill_teacher_cache, fit

CLASSES = ("ant", "bee", "cat", "dog")
FAST = [
    "data.source=imagefolder",
    "data.val_size=8",
    "model.name=resnet8",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "train.warmup_epochs=0",
    "data.workers=0",
]


def make_folder(root, width=32, height=32, train=10, test=3, seed=0):
    """root/{train,test}/<class>/*.png of random colour pixels; returns root as a string."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return str(root)


def cfg(root, *overrides):
    return load_config("digits-teacher", [*FAST, f"data.root={root}", *overrides])


def batches_of(batches, epoch):
    batches.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in batches]


def test_a_small_budget_streams_and_a_large_one_decodes(tmp_path, caplog):
    root = make_folder(tmp_path)
    paths = [p for split in folder_samples(root)[1].values() for p, _ in split]
    assert decoded_bytes(paths) == 52 * 32 * 32 * 3  # one size: the estimate is exact
    with caplog.at_level(logging.INFO, logger="erde.data"):
        streamed = prepare_data(cfg(root, "data.device_budget_gb=1e-4"))
    assert streamed.streamed
    assert "the 52 images take about 0.00016 GB decoded, above the budget of 0.0001 GB" in (
        caplog.text
    )
    decoded = prepare_data(cfg(root, "data.device_budget_gb=1"))
    assert not decoded.streamed
    assert not prepare_data(cfg(root, "data.device_budget_gb=1e-4", "data.stream=never")).streamed
    # Both forms describe the same data: classes, labels, split and statistics (exactly).
    assert data_info(streamed.data) == data_info(decoded.data)
    assert torch.equal(streamed.data.train_y, decoded.data.train_y)
    assert torch.equal(streamed.val_idx, decoded.val_idx)
    x = decoded.data.train_x.double() / 255
    mean = x.mean(dim=(0, 1, 2))
    std = x.std(dim=(0, 1, 2), correction=0)
    np.testing.assert_allclose(streamed.data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.data.std, std, rtol=1e-12)


def _both(root, **options):
    """DeviceBatches of the decoded folder and StreamBatches of its files, each image labelled
    with its index, so the labels of a batch say which images it holds."""
    data = load_source("imagefolder", root)
    paths = [p for p, _ in folder_samples(root)[1]["train"]]
    index = torch.arange(len(paths))
    common = {"mean": data.mean, "std": data.std, "shuffle": True, **options}
    workers = common.pop("workers", 0)
    device = DeviceBatches(data.train_x, index, **common)
    stream = StreamBatches(paths, index, channels=3, size=32, hflip=True, workers=workers, **common)
    return device, stream


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 8, "seed": 3},
        {"batch_size": 6, "seed": 1, "rank": 1, "world_size": 3, "drop_last": True},
        {"batch_size": 7, "seed": 2, "rank": 0, "world_size": 3, "workers": 1},
    ],
)
def test_stream_gives_the_batches_of_device_batches(tmp_path, options):
    device, stream = _both(make_folder(tmp_path), **options)
    assert len(device) == len(stream) and device.num_samples == stream.num_samples
    for epoch in range(3):
        a, b = batches_of(device, epoch), batches_of(stream, epoch)
        assert len(a) == len(b) == len(device)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb)  # the same images, in the same order
            assert torch.equal(xa, xb)  # the same pixels, normalised alike
    assert not torch.equal(batches_of(stream, 0)[0][1], batches_of(stream, 1)[0][1])


def test_augmented_stream_is_a_function_of_seed_and_epoch(tmp_path):
    root = make_folder(tmp_path, width=40, height=48)
    paths = [p for p, _ in folder_samples(root)[1]["train"]]
    labels = torch.arange(len(paths))
    options = {
        "batch_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3, "size": 24,
        "shuffle": True, "augment": True, "hflip": True, "seed": 5,
    }  # fmt: skip
    first = StreamBatches(paths, labels, workers=1, **options)
    run = [batches_of(first, e) for e in range(3)]
    assert run[0][0][0].shape == (8, 3, 24, 24)
    state = torch.get_rng_state()
    resumed = batches_of(StreamBatches(paths, labels, workers=0, **options), 2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    for (xa, ya), (xb, yb) in zip(run[2], resumed, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # The crops are random: the same image comes out differently in another epoch.
    where = {int(i): k for k, i in enumerate(torch.cat([y for _, y in run[1]]))}
    x1 = torch.cat([x for x, _ in run[1]])
    x2 = torch.cat([x for x, _ in run[2]])
    order2 = torch.cat([y for _, y in run[2]])
    assert not torch.equal(x2[0], x1[where[int(order2[0])]])


def test_evaluation_gives_the_logits_of_the_decoded_folder(tmp_path):
    root = make_folder(tmp_path)
    decoded = prepare_data(cfg(root, "data.stream=never"))
    streamed = prepare_data(cfg(root, "data.stream=always", "data.workers=1"))
    torch.manual_seed(0)
    net = build_model(cfg(root).model, data_info(decoded.data)).eval()
    for part in ("val", "test"):
        with torch.no_grad():
            a = [torch.stack(net(x), 1) for x, _ in eval_batches(cfg(root), decoded, part, "cpu")]
            b = [torch.stack(net(x), 1) for x, _ in eval_batches(cfg(root), streamed, part, "cpu")]
        assert len(a) == len(b) > 0
        for za, zb in zip(a, b, strict=True):
            assert torch.equal(za, zb)


def weights(run):
    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_streamed_training_runs_evaluates_and_resumes(tmp_path):
    root = make_folder(tmp_path / "images", width=40, height=48)
    options = [*FAST, f"data.root={root}", "data.stream=always", "data.image_size=32"]
    straight = tmp_path / "straight"
    done = subprocess.run(
        [sys.executable, "-m", "erde", "train", "digits-teacher", *options, "train.epochs=2",
         "--out", str(straight), "--no-progress"],
        capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # same sums as fit
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "streaming the images from their files with 0 worker(s)" in done.stdout
    assert f"finished {straight}: epoch 2, val accuracy (%) exit 1:" in done.stdout
    rows = read_jsonl(straight / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val/acc/1"] <= 1 for r in rows)
    meta = json.loads((straight / "model.json").read_text())["data"]
    assert (meta["input_size"], meta["in_channels"], meta["classes"]) == (32, 3, list(CLASSES))
    # `erde evaluate` streams val and test through the engine's own eval path: its val accuracy
    # per exit is the last epoch's, which training measured on the same split.
    evaluated = subprocess.run(
        [sys.executable, "-m", "erde", "evaluate", str(straight), "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((straight / "eval" / "report.json").read_text())
    exits = sorted(k for k in rows[-1] if k.startswith("val/acc/"))
    assert report["per_exit_accuracy"]["val"] == pytest.approx([rows[-1][k] for k in exits])

    interrupted = tmp_path / "interrupted"
    fit(load_config("digits-teacher", [*options, "train.epochs=2"]), interrupted,
        progress=False, stop_after=1)  # fmt: skip
    fit(None, interrupted, resume=True, progress=False)
    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_streamed_students_run_the_teacher_without_its_cache(tmp_path, caplog):
    root = make_folder(tmp_path / "images")
    teacher = tmp_path / "teacher"
    options = [*FAST, f"data.root={root}", "data.stream=always", "train.epochs=1"]
    fit(load_config("digits-teacher", options), teacher, progress=False)
    student = load_config(
        "digits-student", [*options, "distill.method=kd", f"distill.teacher={teacher}"]
    )
    with caplog.at_level(logging.INFO, logger="erde"):
        fill_teacher_cache(student)
        row = fit(student, tmp_path / "kd", progress=False)
    assert "teacher cache off for streamed data: the teacher runs on every batch" in caplog.text
    assert row["train/kl"] > 0  # the teacher's outputs reached the loss
    assert not (teacher / "teacher-cache").exists()


def test_a_file_that_does_not_decode_is_one_line_naming_it(tmp_path):
    root = make_folder(tmp_path)
    not_png = b"\x89PNG\r\n\x1a\n" + b"not really" * 10
    (tmp_path / "train" / "bee" / "001.png").write_bytes(not_png)
    with pytest.raises(ErdeError, match=r"imagefolder: .*train/bee/001\.png: cannot decode") as e:
        prepare_data(cfg(root, "data.stream=always"))  # the pass computing mean/std
    assert "\n" not in str(e.value)
    (tmp_path / "test" / "cat" / "002.png").write_bytes(not_png)
    given = cfg(root, "data.stream=always", "data.mean=[0.5]", "data.std=[0.2]", "data.workers=1")
    split = prepare_data(given)
    assert split.data.in_channels == 1  # the channels follow data.mean
    with pytest.raises(ErdeError, match=r"imagefolder: .*test/cat/002\.png: cannot decode") as e:
        for _ in eval_batches(given, split, "test", torch.device("cpu")):
            pass
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(ErdeError, match="streams them from their files"):
        _ = split.val


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.stream=always"], "data.stream=always streams image folders"),
        (["data.stream=true"], r"data.stream='True' is not allowed; choose one of auto, always"),
        (["data.source=imagefolder", "data.eval_crop=0.875"], "data.eval_crop=0.875 crops"),
        (["data.eval_crop=0"], r"data.eval_crop=0.0 must lie in \(0, 1\]"),
        (["data.mean=[0.5]"], "give both, one value per channel, or neither"),
        (["data.mean=[0.5,0.5]", "data.std=[1,1]"], "1 \\(grey\\) or 3 \\(colour\\)"),
        (["data.std=[0]", "data.mean=[0.5]"], "standard deviations on the 0..1 scale > 0"),
        (["data.workers=-1"], "data.workers=-1 must be >= 0"),
        (["data.device_budget_gb=0"], "data.device_budget_gb=0.0 must be > 0"),
    ],
)
def test_data_keys_are_checked(overrides, message):
    with pytest.raises(ErdeError, match=message):
        load_config("digits-teacher", overrides)


def test_given_statistics_replace_the_computed_ones_in_memory(tmp_path):
    data = prepare_data(load_config("digits-teacher", ["data.mean=[0.3]", "data.std=[0.2]"])).data
    assert (data.mean, data.std) == ((0.3,), (0.2,))
    with pytest.raises(ErdeError, match="have 3 values but the digits images have 1 channel"):
        prepare_data(load_config("digits-teacher", ["data.mean=[0,0,0]", "data.std=[1,1,1]"]))


def test_imagenet_preset_loads_and_validates():
    cfg = load_reproduce_config("imagenet")
    d = cfg.data
    assert (d.source, d.stream, d.image_size, d.eval_crop) == ("imagefolder", "always", 224, 0.875)
    assert (d.mean, d.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    teacher, student = (stage_config(cfg, s, seed=0) for s in ("teacher", "student"))
    assert (teacher.model.name, student.model.name) == (
        "torchvision/resnet50",
        "torchvision/resnet18",
    )
    with torch.device("meta"):  # the names and exits resolve (no weights are downloaded)
        nets = [create_model(c.model.name, num_classes=1000, exits=c.model.exits)
                for c in (teacher, student)]  # fmt: skip
    assert [n.input_size for n in nets] == [224, 224]
    assert [n.num_exits for n in nets] == [4, 4]


def test_a_study_recorded_before_the_stream_keys_is_the_same_study(tmp_path):
    cfg = load_reproduce_config("quickstart")
    text = to_yaml(cfg)
    old = "\n".join(
        line
        for line in text.splitlines()
        if line.split(":")[0].strip()
        not in ("stream", "device_budget_gb", "workers", "image_size", "eval_crop", "mean", "std")
    )
    assert "stream" not in old and "eval_crop" not in old
    recorded = tmp_path / "reproduce.yaml"
    recorded.write_text(old)
    check_study(recorded, cfg)  # keys it lacks take their defaults
    other = load_reproduce_config("quickstart", ["data.workers=3"])
    with pytest.raises(ErdeError, match="holds another study"):
        check_study(recorded, other)


def test_data_in_memory_is_resized_once_by_the_image_size(tmp_path):
    """Without streaming, data.image_size resizes every image once (antialiased, shorter side,
    centre crop): digits' 8 x 8 become 16 x 16, as an independent interpolation makes them."""
    native = prepare_data(load_config("digits-teacher")).data
    split = prepare_data(load_config("digits-teacher", ["data.image_size=16"]))
    data = split.data
    assert data.input_size == (16, 16) and len(data.train_x) == len(native.train_x)
    want = (
        torch.nn.functional.interpolate(
            native.test_x.permute(0, 3, 1, 2).float(),
            size=(16, 16),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round()
        .clamp(0, 255)
        .permute(0, 2, 3, 1)
    )
    assert (data.test_x.float() - want).abs().max() <= 1  # uint8 rounding
    assert (data.mean, data.std) == (native.mean, native.std)
    fit(
        load_config(
            "digits-teacher", ["data.image_size=16", "train.epochs=1", "train.warmup_epochs=0"]
        ),
        tmp_path / "t",
        progress=False,
    )
    assert json.loads((tmp_path / "t" / "model.json").read_text())["data"]["input_size"] == 16


def test_resized_data_that_would_not_fit_is_refused_in_one_line():
    cfg = load_config("digits-teacher", ["data.image_size=4000", "data.device_budget_gb=1"])
    with pytest.raises(ErdeError, match=r"data.image_size=4000: the 1797 digits images would"):
        prepare_data(cfg)
