"""Every user mistake in docs/errors.md, fed to the real command line.

The catalogue is the documentation: each table row of docs/errors.md holds a command and the
message it prints, whose **bold** part must appear. A row's command runs in its own process with
`$NAME` placeholders replaced by folders built once for the module (the table at the end of the
document says what each holds). Each must exit with status 2 and one line on stderr, print no
traceback, and leave every file that existed before unchanged.

Starting Python and importing torch costs seconds per process, so the commands run in processes
forked from one server that imported erde once; each runs `python -m erde`'s `__main__` with its
own argv, stdout and stderr. `test_fork_server_behaves_like_python_m_erde` checks that this is the
same program as a fresh `python -m erde`.
"""

import hashlib
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_reliability import damaged_tiff

from erde.config.schema import load_config, load_reproduce_config, to_yaml
from erde.deploy import export_run
from erde.evaluation.cache import load_cache
from erde.evaluation.runs import evaluate_run
from erde.study.tune import open_storage
from erde.train.engine import fit

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PLACEHOLDER = re.compile(r"\$([A-Z][A-Z0-9_]*)")


@dataclass(frozen=True)
class Mistake:
    id: str
    command: str  # as documented: erde ... with $PLACEHOLDERS
    message: str  # the bold part of the documented message


def read_catalogue(text: str) -> list[Mistake]:
    """Rows `| mistake | `erde ...` | message with **stable part** |` of every table."""
    mistakes = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[1].startswith("`erde "):
            continue
        bold = re.findall(r"\*\*(.+?)\*\*", cells[2])
        assert len(bold) == 1, f"{cells[0]}: mark exactly one stable part in **bold**"
        slug = re.sub(r"[^a-z0-9]+", "-", cells[0].lower()).strip("-")
        mistakes.append(Mistake(slug, cells[1][1:-1], html.unescape(bold[0].replace("\\|", "|"))))
    return mistakes


CATALOGUE = read_catalogue(DOC.read_text(encoding="utf-8"))

FORK_SERVER = r"""
import json, os, runpy, signal, sys, traceback
import erde.cli.main, erde.evaluation.runs, erde.models.macs  # the slow imports, once
import erde.study.reproduce, erde.study.tune, erde.train.engine, torchvision
import erde.deploy.export, erde.deploy.latency, erde.deploy.runtime, onnxruntime
erde.cli.main.build_parser()  # and those the parser makes
for line in sys.stdin:
    argv, out, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.alarm(300)  # a hanging command dies instead of blocking the test
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [sys.argv[0], *argv]
        code = 0
        try:
            runpy.run_module("erde", run_name="__main__", alter_sys=True)
        except SystemExit as exc:  # what the interpreter does with it
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=ENV,
        )

    def run(self, argv: list[str], scratch: Path) -> tuple[int, str, str]:
        out, err = scratch / "stdout", scratch / "stderr"
        self.proc.stdin.write(json.dumps([argv, str(out), str(err)]) + "\n")
        self.proc.stdin.flush()
        code = int(self.proc.stdout.readline())
        return code, out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def write_npz(root: Path, x=None, y=None) -> None:
    """A small valid npz data set (40 + 10 8x8 grey images, 4 classes), x or y replaced if given."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 10)):
        arrays = {
            "x": rng.integers(0, 255, (count, 8, 8, 1), dtype=np.uint8) if x is None else x(count),
            "y": np.arange(count) % 4 if y is None else y(count),
        }
        np.savez(root / f"{split}.npz", **{k: v for k, v in arrays.items() if v is not None})


def write_images(root: Path, empty_class: str | None = None) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(0 if cls == empty_class else 3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )


def copy_run(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in drop])
    return dst


def export_tampering(export: Path, manifest: dict, outside: Path) -> dict[str, dict]:
    """Manifests of `export` edited to name files outside it or to break a field's type, and a
    copy of one piece in `outside` for them to point at."""
    outside.mkdir()
    shutil.copy(export / "exit2.onnx", outside / "exit2.onnx")

    def piece2(**changes) -> dict:
        pieces = [dict(p) for p in manifest["pieces"]]
        pieces[1].update(changes)
        return {**manifest, "pieces": pieces}

    renamed = {**manifest["single"], "outputs": [{"name": "probabilities", "shape": [1, 10]}]}
    renamed["outputs"].append(manifest["single"]["outputs"][1])
    return {
        "EXPORT_DOTDOT": piece2(file="../outside/exit2.onnx"),
        "EXPORT_ABSOLUTE": piece2(file=str(outside / "exit2.onnx")),
        "EXPORT_TEXT_THRESHOLD": {**manifest, "exits": {**manifest["exits"], "threshold": "0.5"}},
        "EXPORT_UNCHAINED": piece2(inputs=[{"name": "image", "shape": ["batch", 1, 8, 8]}]),
        "EXPORT_RENAMED": {**manifest, "single": renamed},
    }


FAST_RUN = ["model.name=resnet8", "data.crop_padding=1", "train.warmup_epochs=0"]


def build_workspace(root: Path) -> dict[str, Path]:
    """Every folder and file a documented command names, keyed by placeholder."""
    fast = FAST_RUN
    teacher = load_config("digits-teacher", [*fast, "train.epochs=1", "train.seed=1"])
    fit(teacher, root / "teacher", progress=False)  # seed 1: other weights than the student's
    fit(load_config("digits-student", [*fast, "train.epochs=1"]), root / "run", progress=False)
    unfinished = root / "unfinished"
    two_epochs = load_config("digits-student", [*fast, "train.epochs=2"])
    fit(two_epochs, unfinished, stop_after=1, progress=False)
    load_cache(root / "teacher", device="cpu")
    p = {
        "TEACHER": root / "teacher",
        "RUN": root / "run",
        "UNFINISHED": unfinished,
        "MISSING": root / "missing",
        "EMPTY": root / "empty",
        "NOT_RUN": root / "notes",
        "FILE": root / "file.txt",
    }
    p["EMPTY"].mkdir()
    p["NOT_RUN"].mkdir()
    (p["NOT_RUN"] / "notes.txt").write_text("my notes\n")
    p["NOTES_WITH_CONFIG"] = root / "notes-with-config"  # a config.yaml among the user's files
    p["NOTES_WITH_CONFIG"].mkdir()
    (p["NOTES_WITH_CONFIG"] / "config.yaml").write_text("lr: 1\n")
    (p["NOTES_WITH_CONFIG"] / "data.txt").write_text("x\n")
    p["FILE"].write_text("a file, not a folder\n")
    for name, record in (("STUDY", "reproduce.yaml"), ("TUNE_STUDY", "tune.yaml")):
        p[name] = root / name.lower()
        p[name].mkdir()
        (p[name] / record).write_text(to_yaml(load_reproduce_config("quickstart")))

    p["BAD_STATE"] = copy_run(unfinished, root / "bad-state")
    (p["BAD_STATE"] / "state.pt").write_bytes(b"garbage")
    p["FOREIGN_STATE"] = copy_run(unfinished, root / "foreign-state")
    torch.save({"weights": torch.zeros(2)}, p["FOREIGN_STATE"] / "state.pt")

    run = p["RUN"]
    p["TRUNCATED"] = copy_run(run, root / "truncated")
    (p["TRUNCATED"] / "model.safetensors").write_bytes(
        (run / "model.safetensors").read_bytes()[:1000]
    )
    p["BAD_SIDECAR"] = copy_run(run, root / "bad-sidecar")
    (p["BAD_SIDECAR"] / "model.json").write_text("{")
    p["NO_SIDECAR"] = copy_run(run, root / "no-sidecar", drop=("model.json",))
    p["MIXED"] = copy_run(run, root / "mixed")
    meta = json.loads((run / "model.json").read_text())
    meta["arch"]["exits"] = [1]  # the sidecar of a two-exit model beside three-exit weights
    (p["MIXED"] / "model.json").write_text(json.dumps(meta))
    p["STALE_CACHE"] = copy_run(run, root / "stale-cache")
    shutil.copy(p["TEACHER"] / "logits.safetensors", p["STALE_CACHE"] / "logits.safetensors")
    p["BAD_CACHE"] = copy_run(run, root / "bad-cache")
    (p["BAD_CACHE"] / "logits.safetensors").write_bytes(b"x")
    p["EVALUATED"] = copy_run(run, root / "evaluated")
    evaluate_run(p["EVALUATED"], device="cpu")  # calibrates an entropy threshold on val
    p["STALE_REPORT"] = copy_run(p["EVALUATED"], root / "stale-report")
    scaled = load_file(p["STALE_REPORT"] / "model.safetensors")
    first = next(k for k, v in scaled.items() if v.is_floating_point())
    scaled[first] = scaled[first] * 0.5  # weights changed after the evaluation
    save_file(scaled, p["STALE_REPORT"] / "model.safetensors")
    replaced = copy_run(p["TEACHER"], root / "teacher-replaced")
    p["STUDENT_OF_REPLACED"] = root / "student-of-replaced"
    kd = load_config("digits-student", [*FAST_RUN, "train.epochs=2", "distill.method=kd",
                                        f"distill.teacher={replaced}"])  # fmt: skip
    fit(kd, p["STUDENT_OF_REPLACED"], stop_after=1, progress=False)
    retrained = load_config("digits-teacher", [*FAST_RUN, "train.epochs=1", "train.seed=2"])
    fit(retrained, replaced, overwrite=True, progress=False)
    p["EVALUATED_MAXPROB"] = copy_run(run, root / "evaluated-maxprob")
    evaluate_run(p["EVALUATED_MAXPROB"], reference=p["TEACHER"], policy="maxprob", device="cpu")

    p["EXPORT"] = root / "export"
    export_run(run, p["EXPORT"], threshold=1.0)
    manifest = json.loads((p["EXPORT"] / "manifest.json").read_text())
    p["EXPORT_TAMPERED"] = copy_run(p["EXPORT"], root / "export-tampered")
    piece = p["EXPORT_TAMPERED"] / "exit2.onnx"
    tampered = bytearray(piece.read_bytes())
    tampered[-1] ^= 1  # one bit of the last byte
    piece.write_bytes(bytes(tampered))
    p["EXPORT_NO_PIECE"] = copy_run(p["EXPORT"], root / "export-no-piece", drop=("exit3.onnx",))
    p["EXPORT_WITH_NOTES"] = copy_run(p["EXPORT"], root / "export-with-notes")
    (p["EXPORT_WITH_NOTES"] / "notes.txt").write_text("mine\n")
    edited = {
        "EXPORT_NEWER": {**manifest, "format_version": 5},
        "EXPORT_OLDER": {**manifest, "format_version": 2},
        "EXPORT_NO_KEYS": {k: v for k, v in manifest.items() if k != "pieces"},
        "EXPORT_ORPHAN": {**manifest, "source_run": str(p["MISSING"])},
        **export_tampering(p["EXPORT"], manifest, root / "outside"),
    }
    for name, edited_manifest in edited.items():
        p[name] = copy_run(p["EXPORT"], root / name.lower())
        (p[name] / "manifest.json").write_text(json.dumps(edited_manifest))
    p["OUTSIDE"] = root / "outside"
    p["EXPORT_LINK_OUT"] = copy_run(p["EXPORT"], root / "export-link-out", drop=("exit2.onnx",))
    (p["EXPORT_LINK_OUT"] / "exit2.onnx").symlink_to(p["OUTSIDE"] / "exit2.onnx")
    p["EXPORT_EXTERNAL"] = copy_run(p["EXPORT"], root / "export-external")
    onnx.save_model(
        onnx.load(str(p["EXPORT"] / "exit2.onnx")),
        str(p["EXPORT_EXTERNAL"] / "exit2.onnx"),
        save_as_external_data=True,
        location="exit2.data",
        size_threshold=0,
    )
    external = json.loads((p["EXPORT_EXTERNAL"] / "manifest.json").read_text())
    external["pieces"][1]["sha256"] = hashlib.sha256(
        (p["EXPORT_EXTERNAL"] / "exit2.onnx").read_bytes()
    ).hexdigest()
    (p["EXPORT_EXTERNAL"] / "manifest.json").write_text(json.dumps(external))
    p["PNG"] = root / "digit.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(p["PNG"])
    p["PNG_BROKEN"] = root / "broken.png"
    p["PNG_BROKEN"].write_bytes(b"not a png")
    p["TIFF_FLOAT"] = root / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(p["TIFF_FLOAT"])
    p["TIFF_DAMAGED"] = damaged_tiff(root / "damaged.tif")

    npz = {
        "NPZ_FLOAT": {"x": lambda n: np.zeros((n, 8, 8, 1), np.float32)},
        "NPZ_CHANNELS_FIRST": {"x": lambda n: np.zeros((n, 1, 8, 8), np.uint8)},
        "NPZ_NO_LABELS": {"y": lambda n: None},
        "NPZ_NEGATIVE": {"y": lambda n: np.full(n, -1)},
        "NPZ_COUNTS": {"y": lambda n: np.arange(n - 1) % 4},
        "NPZ_NOT_SQUARE": {"x": lambda n: np.zeros((n, 8, 6, 1), np.uint8)},
        "NPZ_OBJECTS": {"x": lambda n: np.array([{"pixels": 0}] * n, dtype=object)},
        "NPZ_3_CLASSES": {"y": lambda n: np.arange(n) % 3},
    }
    for name, replaced in npz.items():
        p[name] = root / name.lower()
        write_npz(p[name], **replaced)
    p["NPZ_CORRUPT"] = root / "npz_corrupt"
    p["NPZ_CORRUPT"].mkdir()
    for split in ("train", "test"):
        (p["NPZ_CORRUPT"] / f"{split}.npz").write_bytes(b"not a zip archive")

    p["IMAGES_NO_TRAIN"] = root / "images-no-train"
    (p["IMAGES_NO_TRAIN"] / "test" / "a").mkdir(parents=True)
    p["IMAGES_EMPTY_CLASS"] = root / "images-empty-class"
    write_images(p["IMAGES_EMPTY_CLASS"], empty_class="b")
    p["IMAGES_BROKEN"] = root / "images-broken"
    write_images(p["IMAGES_BROKEN"])
    (p["IMAGES_BROKEN"] / "train" / "a" / "broken.png").write_bytes(b"not a png")

    yaml = {
        "YAML_BROKEN": "data: [\n",
        "YAML_LIST": "- data\n- model\n",
        "YAML_UNKNOWN_SECTION": "foo: 1\n",
        "YAML_PYTHON_TAG": "train:\n  lr: !!python/object/apply:os.getcwd []\n",
        "YAML_DEEP": "train:\n  lr: " + "[" * 300 + "]" * 300 + "\n",
        "YAML_LONG_VALUE": "train:\n  lr: " + "x" * 20000 + "\n",
    }
    for name, text in yaml.items():
        p[name] = root / f"{name.lower()}.yaml"
        p[name].write_text(text)
    studies = {
        "STUDY_BROKEN": ("reproduce.yaml", "YAML_BROKEN"),
        "STUDY_LIST": ("reproduce.yaml", "YAML_LIST"),
        "STUDY_PYTHON_TAG": ("reproduce.yaml", "YAML_PYTHON_TAG"),
        "TUNE_STUDY_BROKEN": ("tune.yaml", "YAML_BROKEN"),
    }
    p["TUNE_KEY_BROKEN"] = root / "tune-key-broken"  # a study key with a flipped bit
    p["TUNE_KEY_BROKEN"].mkdir()
    (p["TUNE_KEY_BROKEN"] / "tune.yaml").write_text(to_yaml(load_reproduce_config("quickstart")))
    (p["TUNE_KEY_BROKEN"] / "study-key").write_bytes(b"erde-tune:study:\xe6f09b23af9d5474\n")
    p["TUNE_DB"] = root / "tune.db"
    open_storage(f"sqlite:///{p['TUNE_DB']}")
    for name, (record, text) in studies.items():
        p[name] = root / name.lower()
        p[name].mkdir()
        (p[name] / record).write_text(yaml[text])
    p.update(damaged_files(root, p))
    return p


def damaged_files(root: Path, p: dict[str, Path]) -> dict[str, Path]:
    """Run-folder files and data sets damaged or made hostile in the ways of issue 14."""
    from erde.evaluation.cache import read_cache, save_cache

    d = {"YAML_EMPTY": root / "yaml_empty.yaml"}
    d["YAML_EMPTY"].write_bytes(b"")
    labels = {
        "NPZ_WRAPPED": lambda n: (np.arange(n) % 4 - 1).astype(np.int64).astype(np.uint64),
        "NPZ_HUGE_LABEL": lambda n: np.where(np.arange(n) == 0, 10**12, np.arange(n) % 4),
        "NPZ_GAP": lambda n: np.arange(n) % 4 * 2,  # labels 0, 2, 4, 6: classes 1, 3, 5 unseen
    }
    for name, y in labels.items():
        d[name] = root / name.lower()
        write_npz(d[name], y=y)
    d["NPZ_DUPLICATE_NAMES"] = root / "npz_duplicate_names"
    write_npz(d["NPZ_DUPLICATE_NAMES"])
    with np.load(d["NPZ_DUPLICATE_NAMES"] / "train.npz") as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(d["NPZ_DUPLICATE_NAMES"] / "train.npz", **arrays, label_names=["a", "b", "a", "c"])
    d["INT64_WEIGHTS"] = copy_run(p["RUN"], root / "int64-weights")
    weights = load_file(d["INT64_WEIGHTS"] / "model.safetensors")
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].to(torch.int64)
    save_file(weights, d["INT64_WEIGHTS"] / "model.safetensors")
    d["NAN_WEIGHTS"] = copy_run(p["RUN"], root / "nan-weights")
    weights = load_file(d["NAN_WEIGHTS"] / "model.safetensors")
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, d["NAN_WEIGHTS"] / "model.safetensors")
    d["BAD_METRICS"] = copy_run(p["UNFINISHED"], root / "bad-metrics")
    (d["BAD_METRICS"] / "metrics.jsonl").write_text('{"epoch": "one"}\n')
    d["METRICS_NEWER"] = copy_run(p["UNFINISHED"], root / "metrics-newer")
    rows = (p["UNFINISHED"] / "metrics.jsonl").read_text().splitlines()
    newer = [json.dumps({**json.loads(r), "format_version": 3}) + "\n" for r in rows]
    (d["METRICS_NEWER"] / "metrics.jsonl").write_text("".join(newer))
    d["REPORT_NEWER"] = copy_run(p["EVALUATED"], root / "report-newer")
    report = json.loads((p["EVALUATED"] / "eval" / "report.json").read_text())
    (d["REPORT_NEWER"] / "eval" / "report.json").write_text(
        json.dumps({**report, "format_version": 3})
    )
    d["NAN_CACHE"] = copy_run(p["EVALUATED"], root / "nan-cache")
    cache = read_cache(d["NAN_CACHE"] / "logits.safetensors")
    cache.logits["val"][0, 0, 0] = float("nan")
    save_cache(d["NAN_CACHE"] / "logits.safetensors", cache)
    d["SIDECAR_TYPES"] = copy_run(p["RUN"], root / "sidecar-types")
    meta = json.loads((p["RUN"] / "model.json").read_text())
    (d["SIDECAR_TYPES"] / "model.json").write_text(json.dumps({**meta, "seed": "zero"}))
    d["SIDECAR_NEWER"] = copy_run(p["RUN"], root / "sidecar-newer")
    (d["SIDECAR_NEWER"] / "model.json").write_text(json.dumps({**meta, "format_version": 4}))
    d["SIDECAR_DEEP"] = copy_run(p["RUN"], root / "sidecar-deep")
    (d["SIDECAR_DEEP"] / "model.json").write_text("[" * 100000 + "]" * 100000)
    d["UNTRUSTED_MODULE"] = copy_run(p["RUN"], root / "untrusted-module")
    meta["arch"]["module"] = "untrusted_pkg.models"
    (d["UNTRUSTED_MODULE"] / "model.json").write_text(json.dumps(meta))
    d["IMAGES_FIFO"] = root / "images-fifo"
    write_images(d["IMAGES_FIFO"])
    os.mkfifo(d["IMAGES_FIFO"] / "train" / "a" / "pipe.png")  # reading it would wait forever
    d.update(damaged_exports(root, p["EXPORT"]))
    return d


def damaged_exports(root: Path, export: Path) -> dict[str, Path]:
    """`export` with manifest values its graphs contradict, or with a graph ONNX Runtime refuses
    whose checksum in the manifest was updated to match."""
    manifest = json.loads((export / "manifest.json").read_text())
    pieces = [dict(piece) for piece in manifest["pieces"]]
    smaller = {"name": "features1", "shape": ["batch", 16, 4, 4]}
    pieces[0]["outputs"] = [smaller, *pieces[0]["outputs"][1:]]
    pieces[1]["inputs"] = [smaller]
    broken = onnx.load(str(export / "exit2.onnx"))
    broken.graph.node[0].input[0] = "nowhere"  # a tensor that no node or initializer gives
    blob = broken.SerializeToString()
    pieces_resigned = [*manifest["pieces"]]
    pieces_resigned[1] = {**pieces_resigned[1], "sha256": hashlib.sha256(blob).hexdigest()}
    pre, exits = manifest["preprocess"], manifest["exits"]

    def preprocess(**changes) -> dict:
        return {**manifest, "preprocess": {**pre, **changes}}

    failing = onnx.load(str(export / "exit2.onnx"))  # loads, then fails in the Conv kernel
    next(a for n in failing.graph.node if n.op_type == "Conv" for a in n.attribute
         if a.name == "group").i = 0  # fmt: skip
    failing_blob = failing.SerializeToString()
    pieces_failing = [*manifest["pieces"]]
    pieces_failing[1] = {**pieces_failing[1], "sha256": hashlib.sha256(failing_blob).hexdigest()}
    edits = {
        "EXPORT_FAILING_GRAPH": {**manifest, "pieces": pieces_failing},
        "EXPORT_TINY_STD": preprocess(std=[1e-300]),
        "EXPORT_TWO_MEANS": preprocess(mean=pre["mean"] * 2),
        "EXPORT_COLOUR_SPEC": preprocess(channels="RGB"),
        "EXPORT_WRONG_RESIZE": preprocess(resize={**pre["resize"], "to": 9}),
        "EXPORT_WRONG_COUNT": {**manifest, "exits": {**exits, "count": 4}},
        "EXPORT_TWIN_CLASSES": {**manifest, "classes": ["0", *manifest["classes"][:-1]]},
        "EXPORT_WRONG_SIZE": preprocess(input_size=16),
        "EXPORT_RESHAPED": {**manifest, "pieces": pieces},
        "EXPORT_BROKEN_GRAPH": {**manifest, "pieces": pieces_resigned},
    }
    d = {}
    for name, edited in edits.items():
        d[name] = copy_run(export, root / name.lower())
        (d[name] / "manifest.json").write_text(json.dumps(edited))
    (d["EXPORT_BROKEN_GRAPH"] / "exit2.onnx").write_bytes(blob)
    (d["EXPORT_FAILING_GRAPH"] / "exit2.onnx").write_bytes(failing_blob)
    return d


@dataclass
class Workspace:
    root: Path
    paths: dict[str, Path]
    digests: dict[Path, str]  # of every file, as the last command left it


def digests(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    paths = build_workspace(root)
    return Workspace(root, paths, digests(root))


@pytest.fixture(scope="module")
def fork_server(workspace):
    server = ForkServer(workspace.root)
    yield server
    server.close()


def expand(text: str, paths: dict[str, Path], out: Path) -> str:
    def path(match: re.Match) -> str:
        name = match.group(1)
        if name == "OUT":
            return str(out)
        assert name in paths, f"${name} is not built by build_workspace"
        return str(paths[name])

    return PLACEHOLDER.sub(path, text)


def test_the_catalogue_is_complete():
    assert len(CATALOGUE) >= 30
    assert len({m.id for m in CATALOGUE}) == len(CATALOGUE), "give every mistake its own name"
    commands = {m.command.split()[1] for m in CATALOGUE}
    assert {"config", "train", "macs", "evaluate", "compare", "reproduce"} <= commands


@pytest.mark.slow
@pytest.mark.parametrize("mistake", CATALOGUE, ids=[m.id for m in CATALOGUE])
def test_mistake_exits_2_with_its_message(mistake, workspace, fork_server, tmp_path):
    out = workspace.root / "out" / mistake.id
    argv = [expand(a, workspace.paths, out) for a in shlex.split(mistake.command)[1:]]
    code, _, err = fork_server.run(argv, tmp_path)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"erde {argv[0]}: error: ")
    assert expand(mistake.message, workspace.paths, out) in lines[0]
    before, workspace.digests = workspace.digests, digests(workspace.root)
    assert [p for p, digest in before.items() if workspace.digests.get(p) != digest] == []


@pytest.mark.slow
def test_fork_server_behaves_like_python_m_erde(workspace, fork_server, tmp_path):
    argv = ["evaluate", str(workspace.paths["MISSING"])]
    fresh = subprocess.run(
        [sys.executable, "-m", "erde", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=workspace.root,
    )
    assert fresh.returncode == 2
    assert fork_server.run(argv, tmp_path) == (fresh.returncode, fresh.stdout, fresh.stderr)
