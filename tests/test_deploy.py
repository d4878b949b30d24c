"""Export, early-exit runtime, image files, `erde infer` and the latency benchmark, on a small
digits student trained once for the module."""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from erde.cli.deploy import add_commands
from erde.config.schema import load_config
from erde.data import DeviceBatches
from erde.data.prepare import prepare_data
from erde.deploy import EarlyExitRuntime, export_run
from erde.deploy.early_exit_model import EarlyExitModel
from erde.deploy.images import load_image, normalize_images
from erde.deploy.latency import benchmark, render_benchmark
from erde.deploy.manifest import Deployment
from erde.errors import ErdeError
from erde.evaluation.policy import confidence_scores, simulate
from erde.evaluation.runs import evaluate_run
from erde.models.load import load_model
from erde.run.model_info import DataInfo, ModelInfo
from erde.train.engine import fit

TIE = 1e-5  # scores this close to the threshold may fall either way between ORT and PyTorch
LOGITS_ATOL = 1e-4  # ONNX Runtime vs PyTorch, float32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("deploy") / "student"
    cfg = load_config(
        "digits-student",
        ["model.name=resnet8", "train.epochs=2", "train.batch_size=128", "data.crop_padding=1"],
    )
    fit(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def images(run):
    """Validation and test images of the run (a few hundred), normalised as in evaluation."""
    split = prepare_data(load_config(str(run / "config.yaml")))
    data = split.data
    x = torch.cat([data.train_x[split.val_idx], data.test_x])
    y = torch.cat([data.train_y[split.val_idx], data.test_y])
    batches = DeviceBatches(x, y, batch_size=len(y), mean=data.mean, std=data.std)
    xb, yb = next(iter(batches))
    return xb, yb, x


@pytest.fixture(scope="module")
def torch_logits(run, images):
    model, _ = load_model(run)
    with torch.no_grad():
        return torch.stack(model(images[0]), dim=1)  # N x E x K


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported exporter, nothing to silence
        manifest = export_run(run, out, threshold=1.5)
    return out, manifest


def test_from_pretrained_on_an_export_points_at_the_runtime(run, exported):
    with pytest.raises(
        ErdeError, match=r"is an `erde export` folder .*EarlyExitRuntime\.from_export"
    ):
        EarlyExitModel.from_pretrained(exported[0])
    # what the message points at loads it
    assert (
        EarlyExitRuntime.from_export(exported[0]).classes
        == EarlyExitModel.from_pretrained(run).info.data.classes
    )


def quantile_thresholds(logits: torch.Tensor, policy: str) -> list[float]:
    """Thresholds that send some images out at every exit: quantiles of the exit-1 scores."""
    scores = confidence_scores(logits, policy)[:, 0]
    return [float(scores.quantile(q)) for q in (0.2, 0.5, 0.8)]


def unexplained(tensors: list[dict]) -> list[dict]:
    """Tensor entries without the meaning the manifest gives them for people."""
    return [{k: v for k, v in t.items() if k != "meaning"} for t in tensors]


@pytest.mark.slow
def test_export_writes_checked_pieces_and_manifest(run, exported):
    out, written = exported
    manifest = json.loads((out / "manifest.json").read_text())  # the file, key by key
    assert manifest == written.to_json()
    meta = json.loads((run / "model.json").read_text())
    p, e = manifest["preprocess"], manifest["exits"]
    assert e["macs"] == meta["exit_macs"] and e["count"] == 3
    assert e["static_macs"] == meta["static_macs"]
    assert manifest["classes"] == [str(k) for k in range(10)]
    assert (p["input_size"], p["in_channels"], p["channels"]) == (8, 1, "grey")
    assert p["mean"] == meta["data"]["mean"] and p["std"] == meta["data"]["std"]
    assert (p["resize"]["to"], p["crop"]["size"], p["crop"]["fraction"]) == (8, 8, 1.0)
    assert (p["layout"], p["dtype"], p["divide_by"]) == ("NCHW", "float32", 255)
    assert (e["threshold"], e["policy"], e["normalize"]) == (1.5, "entropy", False)
    assert e["numbering"] == "1-based" and "nats" in e["score"]
    assert (manifest["opset"], manifest["precision"]) == (18, "fp32")
    assert manifest["exporter"].startswith("torch.onnx.export(dynamo=True)")
    pieces = [{**x, **{k: unexplained(x[k]) for k in ("inputs", "outputs")}} for x in
              manifest["pieces"]]  # fmt: skip
    single = {k: unexplained(manifest["single"][k]) for k in ("inputs", "outputs")}
    assert [p["file"] for p in pieces] == ["exit1.onnx", "exit2.onnx", "exit3.onnx"]
    assert single["inputs"] == [
        {"name": "image", "shape": [1, 1, 8, 8]},
        {"name": "thresholds", "shape": [2]},
    ]
    assert single["outputs"] == [
        {"name": "logits", "shape": [1, 10]},
        {"name": "exit", "shape": [1]},
    ]
    assert manifest["single"]["outputs"][1]["meaning"] == "int64, the exit that answered (1..3)"
    assert pieces[0]["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8]}]
    for i, (before, after) in enumerate(itertools.pairwise(pieces), start=1):
        assert [o["name"] for o in before["outputs"]] == [f"features{i}", f"logits{i}", f"score{i}"]
        assert before["outputs"][0] == after["inputs"][0]
        assert before["outputs"][1]["shape"] == ["batch", 10]
        assert before["outputs"][2]["shape"] == ["batch"]
    assert pieces[-1]["outputs"] == [{"name": "logits3", "shape": ["batch", 10]}]
    for entry in [*pieces, manifest["static"], manifest["single"]]:
        path = out / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    # The batch dimension is dynamic: the static graph takes 1 and 5 images.
    session = ort.InferenceSession(str(out / "static.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        logits = session.run(None, {"image": np.zeros((n, 1, 8, 8), np.float32)})[0]
        assert logits.shape == (n, 10)


@pytest.mark.slow
def test_static_graph_is_the_final_exit(exported, images, torch_logits):
    out, _ = exported
    session = ort.InferenceSession(str(out / "static.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": images[0].numpy()})[0]
    np.testing.assert_allclose(logits, torch_logits[:, -1].numpy(), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_default_threshold_is_the_calibrated_one(run, tmp_path):
    report = evaluate_run(run, device="cpu")
    manifest = export_run(run, tmp_path / "calibrated")
    assert manifest.deployment.threshold == report.chosen.threshold
    assert manifest.deployment.policy == report.policy == "entropy"
    assert manifest.deployment.threshold_source.startswith("calibrated on val")
    with pytest.raises(ErdeError, match="calibrated for policy 'entropy'"):
        export_run(run, tmp_path / "other", policy="maxprob")
    other = export_run(run, tmp_path / "other", policy="maxprob", threshold=0.1)
    assert other.deployment.policy == "maxprob"


@pytest.mark.slow
def test_export_never_replaces_a_foreign_folder(run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ErdeError, match="not empty and holds no erde export"):
        export_run(run, out, threshold=1.0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(ErdeError, match="non-negative"):
        export_run(run, tmp_path / "bad", threshold=-1.0)
    with pytest.raises(ErdeError, match="not empty and holds no erde export"):
        export_run(run, out, threshold=1.0, overwrite=True)  # not erde's folder to empty
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    mine = tmp_path / "mine"
    export_run(run, mine, threshold=1.0)
    # An earlier export is replaced without --overwrite ...
    assert export_run(run, mine, threshold=2.0).deployment.threshold == 2.0
    assert json.loads((mine / "manifest.json").read_text())["exits"]["threshold"] == 2.0
    # ... unless it also holds a file of the user's: then only with --overwrite.
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ErdeError, match=r"files it did not write \(notes.txt\)"):
        export_run(run, mine, threshold=3.0)
    assert (mine / "notes.txt").read_text() == "mine"
    export_run(run, mine, threshold=3.0, overwrite=True)
    assert not (mine / "notes.txt").exists()
    for around in (run, run.parent, run / "export"):
        with pytest.raises(ErdeError, match="inside it or above it"):
            export_run(run, around, threshold=1.0, overwrite=True)


@pytest.mark.parametrize("threads", [-1, len(os.sched_getaffinity(0)) + 1, 100000])
def test_a_thread_count_beyond_the_cores_is_refused_before_any_session(exported, threads):
    with pytest.raises(ErdeError, match=f"threads={threads}: give 0"):
        EarlyExitRuntime.from_export(exported[0], threads=threads)
    cores = len(os.sched_getaffinity(0))
    assert len(EarlyExitRuntime.from_export(exported[0], threads=cores).pieces) == 3


@pytest.mark.slow
def test_altered_or_missing_files_are_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[0], copy)
    blob = bytearray((copy / "exit2.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "exit2.onnx").write_bytes(bytes(blob))
    with pytest.raises(ErdeError, match=r"exit2\.onnx does not match the checksum"):
        EarlyExitRuntime.from_export(copy)
    (copy / "exit2.onnx").unlink()
    with pytest.raises(ErdeError, match=r"exit2\.onnx is missing"):
        EarlyExitRuntime.from_export(copy)
    with pytest.raises(ErdeError, match="not an erde export"):
        EarlyExitRuntime.from_export(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["entropy", "maxprob", "margin"])
def test_runtime_agrees_with_the_simulator(run, images, torch_logits, tmp_path, policy):
    x = images[0]
    n = len(x)
    assert n >= 300
    export_run(run, tmp_path / policy, threshold=0.5, policy=policy)
    onnx_rt = EarlyExitRuntime.from_export(tmp_path / policy, threads=1)
    torch_rt = EarlyExitRuntime.from_run(run, threshold=0.5, policy=policy)
    scores = confidence_scores(torch_logits, policy)
    # One threshold for all exits, and one per exit (chosen so that every exit answers some).
    per_exit = [float(scores[:, 0].quantile(0.3)), float(scores[:, 1].quantile(0.5))]
    assert simulate(torch_logits, per_exit, policy)[0].unique().tolist() == [0, 1, 2]
    for threshold in [*quantile_thresholds(torch_logits, policy), per_exit]:
        exit_index, prediction = simulate(torch_logits, threshold, policy)
        assert len(set(exit_index.tolist())) >= 2
        # Images whose score at an exit they reach lies within TIE of that exit's threshold.
        cut = torch.tensor(threshold).expand(2)
        reached = torch.arange(2)[None, :] <= exit_index[:, None]
        tie = (((scores[:, :2] - cut).abs() < TIE) & reached).any(dim=1).numpy()
        assert tie.sum() <= 3
        for rt, form in ((onnx_rt, "split"), (onnx_rt, "single"), (torch_rt, "auto")):
            pred = rt.predict(x, threshold, form=form)
            same = pred.exits == exit_index.numpy() + 1  # simulate's exits are 0-based
            assert np.all(same | tie), f"{rt.backend} {form}: {(~same & ~tie).sum()} differ"
            assert np.all((pred.labels == prediction.numpy()) | tie)
            want = torch_logits[torch.arange(n), exit_index].numpy()
            np.testing.assert_allclose(pred.logits[same], want[same], atol=LOGITS_ATOL, rtol=0)
            np.testing.assert_allclose(
                pred.probabilities, torch.softmax(torch.from_numpy(pred.logits), 1), atol=1e-6
            )


@pytest.mark.slow
def test_batch_splitting_runs_later_pieces_only_on_undecided_images(exported, images, torch_logits):
    rt = EarlyExitRuntime.from_export(exported[0], threads=1)
    x = images[0][:64]
    seen = [[] for _ in rt.pieces]

    def counting(i, piece):
        def run(batch):
            seen[i].append(len(batch))
            return piece(batch)

        return run

    rt.pieces = [counting(i, p) for i, p in enumerate(rt.pieces)]
    nothing = rt.predict(x[:0])
    assert seen == [[], [], []] and nothing.probabilities.shape == (0, 10)
    huge = rt.predict(x, threshold=1e9)
    assert seen == [[64], [], []]
    assert huge.images_per_piece == [64, 0, 0]
    assert (huge.exits == 1).all()

    seen[:] = [[] for _ in rt.pieces]
    rt.predict(x, threshold=0.0, form="split")  # `auto` would run static.onnx at 0
    assert seen == [[64], [64], [64]]

    seen[:] = [[] for _ in rt.pieces]
    threshold = quantile_thresholds(torch_logits[:64], "entropy")[1]
    exit_index, _ = simulate(torch_logits[:64], threshold)
    rt.predict(x, threshold=threshold)
    assert seen == [[64], [int((exit_index >= 1).sum())], [int((exit_index == 2).sum())]]


def test_split_batches_return_results_in_input_order():
    """Hand-made pieces: image k carries the number k; even images are sure at exit 1, images
    divisible by 3 (and odd) at exit 2, the rest answer at exit 3. Each exit predicts class
    (k + exit) % 4, so any mix-up of images or exits shows in the classes."""
    seen = []

    def piece(i, last):
        def run(x):  # pieces take and give numpy arrays
            x = torch.from_numpy(x)
            k = x[:, 0, 0, 0].round().long()
            seen.append((i, k.tolist()))
            sure = (k % 2 == 0) if i == 0 else (k % 3 == 0) if i == 1 else k >= 0
            logits = torch.zeros(len(k), 4)
            logits[torch.arange(len(k)), (k + i) % 4] = torch.where(sure, 50.0, 0.1)
            if last:
                return None, logits.numpy(), None
            scores = confidence_scores(logits[:, None, :], "entropy")[:, 0]
            return x.numpy(), logits.numpy(), scores.numpy()

        return run

    info = ModelInfo(
        arch={"name": "test"},
        exit_macs=[1, 2, 3],
        static_macs=3,
        data=DataInfo("test", list("abcd"), [0.0], [1.0], input_size=1, in_channels=1),
    )
    rt = EarlyExitRuntime(
        [piece(0, False), piece(1, False), piece(2, True)],
        info,
        Deployment(0.1, "entropy", False, "given"),
        backend="test",
    )
    ids = list(range(10))
    pred = rt.predict(torch.tensor(ids, dtype=torch.float32).view(10, 1, 1, 1))
    want_exit = [1 if k % 2 == 0 else 2 if k % 3 == 0 else 3 for k in ids]
    assert pred.exits.tolist() == want_exit
    assert pred.labels.tolist() == [(k + e - 1) % 4 for k, e in zip(ids, want_exit, strict=True)]
    assert seen == [(0, ids), (1, [1, 3, 5, 7, 9]), (2, [1, 5, 7])]
    assert pred.images_per_piece == [10, 5, 3]


def score_pieces(calls: list[str]) -> list:
    """Three hand-made pieces: image j carries its exit-1 score in x[j, 0, 0, 0] and its exit-2
    score in x[j, 0, 0, 1] (exact float32 values); exit i predicts class i - 1."""

    def piece(i: int):
        def run(x: np.ndarray):
            calls.append(f"piece{i + 1}")
            logits = np.zeros((len(x), 4), np.float32)
            logits[:, i] = 5.0
            return (x, logits, x[:, 0, 0, i].copy()) if i < 2 else (None, logits, None)

        return run

    return [piece(0), piece(1), piece(2)]


def score_single(calls: list[str]):
    """The single-call form of `score_pieces`, by hand: the first exit whose score is below its
    threshold answers (exits numbered from 1, as the graph does)."""

    def single(x: np.ndarray, cutoffs: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append("single")
        scores = x[0, 0, 0, :2]
        exit_at = next((i for i in range(2) if scores[i] < cutoffs[i]), 2)
        logits = np.zeros((1, 4), np.float32)
        logits[0, exit_at] = 5.0
        return logits, exit_at + 1

    return single


def score_runtime(calls: list[str], single: bool = False) -> EarlyExitRuntime:
    """A runtime on `score_pieces` with a static network that answers class 3 (as exit 3) and,
    with `single`, the single-call form `score_single`."""

    def static(x: np.ndarray) -> np.ndarray:
        calls.append("static")
        logits = np.zeros((len(x), 4), np.float32)
        logits[:, 2] = 5.0
        return logits

    info = ModelInfo(
        arch={"name": "test"},
        exit_macs=[1, 2, 3],
        static_macs=3,
        data=DataInfo("test", list("abcd"), [0.0], [1.0], input_size=2, in_channels=1),
    )
    point = Deployment(0.0, "entropy", False, "given")
    return EarlyExitRuntime(
        score_pieces(calls),
        info,
        point,
        backend="test",
        static=static,
        single=score_single(calls) if single else None,
    )


def score_images(rows: list[tuple[float, float]]) -> torch.Tensor:
    x = torch.zeros(len(rows), 1, 2, 2)
    x[:, 0, 0] = torch.tensor(rows)
    return x


@pytest.mark.parametrize("form", ["auto", "split"])
def test_a_score_equal_to_its_threshold_goes_on_to_the_next_exit(form: str) -> None:
    """`score < threshold`, strictly: an exact tie is not sure enough, a score one float32 step
    below is."""
    calls: list[str] = []
    rt = score_runtime(calls)
    step = float(np.nextafter(np.float32(0.5), np.float32(0)))  # the float32 just below 0.5
    x = score_images([(0.5, 0.25), (step, 9.0), (0.5, 0.5), (0.75, step), (0.0, 0.0)])
    pred = rt.predict(x, [0.5, 0.5], form=form)
    assert pred.exits.tolist() == [2, 1, 3, 2, 1]
    assert pred.labels.tolist() == [1, 0, 2, 1, 0]
    assert "static" not in calls
    assert rt.with_threshold(0.5).predict(x, form=form).exits.tolist() == [2, 1, 3, 2, 1]


def test_the_static_network_runs_only_when_every_threshold_is_zero() -> None:
    """A threshold of 0 at one exit still lets images out at the others: only all zeros means
    no image can leave early, and only then does `auto` run the static network."""
    calls: list[str] = []
    rt = score_runtime(calls)
    x = score_images([(0.0, 0.0), (0.25, 0.25), (0.75, 0.75)])
    for threshold, exits in (([0.0, 0.5], [2, 2, 3]), ([0.5, 0.0], [1, 1, 3])):
        calls.clear()
        assert rt.predict(x, threshold).exits.tolist() == exits
        assert "static" not in calls
        calls.clear()
        assert rt.with_threshold(threshold).predict(x).exits.tolist() == exits
        assert "static" not in calls
    calls.clear()
    pred = rt.predict(x, [0.0, 0.0])
    assert calls == ["static"] and pred.exits.tolist() == [3, 3, 3]
    calls.clear()
    assert rt.with_threshold(0.0).predict(x).exits.tolist() == [3, 3, 3]
    assert calls == ["static"]


def test_one_image_takes_the_single_call_form_and_a_batch_the_pieces() -> None:
    """`auto`: the single-call graph for a batch of one, the pieces for more; `single` and
    `split` force one form. Both give the same exits and classes."""
    calls: list[str] = []
    rt = score_runtime(calls, single=True)
    x = score_images([(0.25, 9.0), (0.75, 0.25), (0.75, 0.75)])
    want = [1, 2, 3]
    for j in range(3):
        calls.clear()
        one = rt.predict(x[j : j + 1], [0.5, 0.5])
        assert calls == ["single"]
        assert (one.exits.tolist(), one.labels.tolist()) == ([want[j]], [want[j] - 1])
    for batch, pieces in ((x[:2], ["piece1", "piece2"]), (x, ["piece1", "piece2", "piece3"])):
        calls.clear()
        got = rt.predict(batch, [0.5, 0.5])
        assert calls == pieces and got.exits.tolist() == want[: len(batch)]
    calls.clear()
    forced = rt.predict(x, [0.5, 0.5], form="single")
    assert calls == ["single"] * 3
    assert forced.exits.tolist() == want and forced.labels.tolist() == [0, 1, 2]
    assert forced.images_per_piece == [3, 2, 1]
    calls.clear()
    assert rt.predict(x[:1], [0.5, 0.5], form="split").exits.tolist() == [1]
    assert calls == ["piece1"]


def test_unknown_or_missing_forms_are_named() -> None:
    x = score_images([(0.25, 0.25)])
    with pytest.raises(ErdeError) as err:
        score_runtime([], single=True).predict(x, form="fast")
    assert str(err.value) == "unknown runtime form 'fast'; choose one of auto, single, split"
    with pytest.raises(ErdeError) as err:
        score_runtime([]).predict(x, form="single")
    assert str(err.value) == (
        "the test runtime has no single-call graph (an `erde export` folder has one); use form "
        "'split' or 'auto'"
    )


@pytest.mark.slow
def test_image_files_are_decoded_resized_and_normalised_as_in_training(run, images, tmp_path):
    _, _, raw = images
    meta = json.loads((run / "model.json").read_text())["data"]
    want = DeviceBatches(
        raw,
        torch.zeros(len(raw), dtype=torch.int64),
        batch_size=len(raw),
        mean=meta["mean"],
        std=meta["std"],
    )
    assert torch.equal(normalize_images(raw, meta["mean"], meta["std"]), next(iter(want))[0])

    Image.fromarray(raw[0, :, :, 0].numpy(), "L").save(tmp_path / "grey.png")
    assert np.array_equal(load_image(tmp_path / "grey.png", 1, 8), raw[0].numpy())
    # Colour file, grey model: ITU-R 601-2 luma, 200*.299 + 100*.587 + 50*.114 = 124.2 -> 124.
    Image.new("RGB", (20, 12), (200, 100, 50)).save(tmp_path / "colour.png")
    pixels = load_image(tmp_path / "colour.png", 1, 8)
    assert pixels.shape == (8, 8, 1) and (pixels == 124).all()
    # Grey file, colour model: the grey value in all three channels.
    Image.new("L", (8, 8), 77).save(tmp_path / "flat.png")
    assert (load_image(tmp_path / "flat.png", 3, 8) == 77).all()
    # 16-bit grey is scaled to 8 bits as in training: round(300 * 255 / 65535) = 1.
    Image.new("I;16", (8, 8), 300).save(tmp_path / "deep.png")
    assert (load_image(tmp_path / "deep.png", 1, 8) == 1).all()
    with pytest.raises(ErdeError, match=r"nothing\.png: no such file"):
        load_image(tmp_path / "nothing.png", 1, 8)
    with pytest.raises(ErdeError, match="4-channel"):
        load_image(tmp_path / "flat.png", 4, 8)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erde")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help, examples=()):  # the CLI helper's signature
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    add_commands(sub, command)
    return parser


@pytest.mark.slow
def test_infer_classifies_files_and_reports_bad_ones(run, exported, images, tmp_path, capsys):
    x, _, raw = images
    rt = EarlyExitRuntime.from_export(exported[0], threads=1)
    files = []
    for k in range(3):
        files.append(tmp_path / f"digit{k}.png")
        Image.fromarray(raw[k, :, :, 0].numpy(), "L").save(files[-1])
    jpeg = io.BytesIO()
    Image.fromarray(raw[3, :, :, 0].numpy()).resize((32, 32)).convert("RGB").save(jpeg, "JPEG")
    (tmp_path / "digit3.jpg").write_bytes(jpeg.getvalue())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    paths = [files[0], tmp_path / "broken.png", files[1], files[2], tmp_path / "digit3.jpg"]

    rows = rt.classify_files(paths, batch_size=2)
    assert [r.file for r in rows] == [str(p) for p in paths]
    assert rows[1].error is not None and "broken.png" in rows[1].error
    want = rt.predict(x[:3])  # PNGs are lossless, so they give the same input as the data set
    good = [rows[0], rows[2], rows[3]]
    assert [r.class_name for r in good] == [rt.classes[c] for c in want.labels]
    assert [r.exit for r in good] == want.exits.tolist()
    np.testing.assert_allclose([r.confidence for r in good], want.confidence, atol=1e-6)
    assert rows[4].error is None and rows[4].class_name in rt.classes

    args = _parser().parse_args(["infer", str(exported[0]), *map(str, paths), "--threads", "1"])
    with pytest.raises(ErdeError, match="1 of 5 image"):
        args.func(args)
    out = capsys.readouterr().out
    assert out.count("\n") == 2 + len(paths)
    assert f"| {files[0]} | {rows[0].class_name} | {rows[0].exit} |" in out
    assert "broken.png | error | - |" in out


@pytest.mark.slow
def test_bench_names_a_network_trained_as_teacher_a_teacher(tmp_path):
    cfg = load_config(
        "digits-teacher", ["model.name=resnet8", "train.epochs=1", "train.warmup_epochs=0"]
    )
    fit(cfg, tmp_path / "teacher", progress=False)
    result = benchmark(tmp_path / "teacher", thresholds=[0.5], batch_sizes=[4], repeats=2)
    assert [r.model for r in result.rows] == [
        "teacher resnet8, static", "teacher resnet8, early exit"
    ]  # fmt: skip
    assert "student" not in render_benchmark(result)


@pytest.mark.slow
def test_bench_rows_are_consistent(run, images, torch_logits, tmp_path, capsys):
    # The run as its own reference: the "teacher" row must cost exactly the static student.
    result = benchmark(
        run, reference=run, thresholds=[0.0, 1e9], batch_sizes=[1, 8], repeats=4, warmup=1
    )
    rows = result.rows
    # the calibrated threshold: the report of an earlier test, if it ran first
    calibrated = result.export.deployment.threshold
    n_thresholds = len({0.0, 1e9, calibrated})
    assert len(rows) == 2 * (2 + n_thresholds)
    exit_macs, static_macs = result.export.info.exit_macs, result.export.info.static_macs
    for batch in (1, 8):
        part = {(r.model, r.threshold): r for r in rows if r.batch == batch}
        static = part[("student resnet8, static", None)]
        assert static.predicted_speedup == static.realised_speedup == 1.0
        none = part[("student resnet8, early exit", 0.0)]
        assert none.expected_macs == exit_macs[-1] and none.exit_share == [0.0, 0.0, 1.0]
        first = part[("student resnet8, early exit", 1e9)]
        assert first.expected_macs == exit_macs[0] and first.exit_share == [1.0, 0.0, 0.0]
        assert first.predicted_speedup == pytest.approx(static_macs / exit_macs[0])
        reference = part[("reference student resnet8, static", None)]  # a ce run: a student
        assert reference.predicted_speedup == 1.0
        assert reference.accuracy == static.accuracy == none.accuracy
        for r in part.values():
            assert 0 < r.median_ms <= r.p90_ms
            # images/s is the median call's: batch images in median_ms
            assert r.images_per_s == pytest.approx(batch / (r.median_ms / 1000), rel=1e-12)
    args = _parser().parse_args(
        ["bench", str(run), "--thresholds", "0", "--batch", "2", "--repeats", "2"]
    )
    args.func(args)
    out = capsys.readouterr().out
    assert out.count("| student resnet8, early exit |") == len({0.0, calibrated})
    # Both tables: the timed rows and per-exit accuracy (header, fp32), each with a header.
    table = render_benchmark(result)
    assert table.count("\n| ") == len(rows) + 1 + 2
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    column = lines[0].index("timed images")
    # each row says how many images its accuracy is over: 4 batches of 1, then of 8
    assert [line[column] for line in lines[1 : len(rows) + 1]] == [
        str(4 * r.batch) for r in rows
    ] and {r.batch for r in rows} == {1, 8}
    accuracy = result.per_exit_accuracy["fp32"]
    labels = prepare_data(load_config(str(run / "config.yaml"))).data.test_y
    want = (torch_logits[-len(labels) :].argmax(-1) == labels[:, None]).float().mean(0)
    np.testing.assert_allclose(accuracy, want.numpy(), atol=1.5 / len(labels))
