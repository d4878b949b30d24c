"""Every kind of export-folder file (manifest.json, exit1..3.onnx, single.onnx, static.onnx,
DEPLOY.md, which no reader reads; fp32 and int8 exports), damaged at random: truncated, bits
flipped, manifest values (nested ones too) replaced by other types or values, or by JSON text
json.dumps never writes (deep nesting, NaN, huge numbers, duplicate keys:
`fuzz_helpers.NESTED_JSON`). `erde infer` and the loader it uses end with exit status 2 and one
line, or with exit 0 and the clean export's answer; never a traceback, a hang or a wrong answer.

Two kinds of damage get a weaker oracle, because they are edits no check can tell from intent:
- The manifest's own declarations that no graph restates (threshold, class names, mean and std):
  the answer must then be what the clean graphs give under the edited declaration.
- A damaged graph whose SHA-256 in the manifest is updated to match ("resign"), so that ONNX
  loading itself is exercised rather than the checksum: the manifest vouches for that graph, so
  the answer must be what it gives (run here with plain ONNX Runtime sessions, the rule applied
  by hand), or it is refused with a message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fuzz_helpers import EXAMPLES, FAST, check, damage, mutate_json, nest_json, run
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from erde.config.schema import load_config
from erde.data.prepare import prepare_data
from erde.deploy import EarlyExitRuntime, export_run
from erde.deploy.images import normalize_images, read_image
from erde.deploy.manifest import read_manifest
from erde.deploy.runtime import FileResult, export_session
from erde.errors import ErdeError
from erde.train.engine import fit

GRAPHS = ("exit1.onnx", "exit2.onnx", "exit3.onnx", "single.onnx", "static.onnx")
# Two digits: the runtime's own choice, one single.onnx call each, or one batch split by pieces.
FORMS = ("auto", "single", "split")
# Where the manifest declares them: (block, key), or a top-level key.
DECLARED = (("exits", "threshold"), ("classes",), ("preprocess", "mean"), ("preprocess", "std"))


@dataclasses.dataclass
class Clean:
    folder: Path
    runtime: EarlyExitRuntime
    stdout: dict[str, str]  # `erde infer` per form
    rows: dict[str, list[FileResult]]  # the loader's answer per form


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, list[str]]:
    """A one-epoch digits run and two of its test digits as PNG files."""
    root = tmp_path_factory.mktemp("fuzz-export")
    fit(load_config("digits-student", FAST), root / "run", progress=False)
    digits = prepare_data(load_config(str(root / "run" / "config.yaml"))).data.test_x
    paths = []
    for k in range(2):
        paths.append(str(root / f"digit{k}.png"))
        Image.fromarray(digits[k, :, :, 0].numpy(), "L").save(paths[-1])
    return root / "run", paths


@pytest.fixture(scope="module")
def clean(digits, tmp_path_factory) -> dict[str, Clean]:
    """The run exported in fp32 and int8, and their answers on the two digits."""
    run_dir, paths = digits
    exports = {}
    for precision in ("fp32", "int8"):
        folder = tmp_path_factory.mktemp("clean") / precision
        # Threshold 0 never exits early: every piece runs, so a damaged graph is run, not only
        # loaded (and an edited threshold changes the answer).
        export_run(run_dir, folder, threshold=0.0, int8=precision == "int8")
        runtime = EarlyExitRuntime.from_export(folder, threads=1)
        stdout = {}
        for form in FORMS:
            code, stdout[form], err = run(["infer", str(folder), *paths, *options(form)])
            assert code == 0, err
        rows = {form: runtime.classify_files(paths, form=form) for form in FORMS}
        exports[precision] = Clean(folder, runtime, stdout, rows)
    return exports


def declared(manifest: dict, where: tuple[str, ...]) -> object:
    for key in where:
        manifest = manifest[key]
    return manifest


def options(form: str) -> list[str]:
    return ["--threads", "1", "--form", form]


def resign(folder: Path, name: str) -> None:
    """Update the manifest's SHA-256 of `name` to the file as it now is."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in [*manifest["pieces"], manifest["static"], manifest["single"]]:
        if entry["file"] == name:
            entry["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def under_declarations(clean: Clean, manifest: dict) -> EarlyExitRuntime:
    """The clean graphs under the threshold, class names and normalisation `manifest` declares."""
    pre = manifest["preprocess"]
    runtime = clean.runtime.with_threshold(float(manifest["exits"]["threshold"]))  # same sessions
    data = dataclasses.replace(
        runtime.info.data,
        classes=manifest["classes"],
        mean=[float(v) for v in pre["mean"]],
        std=[float(v) for v in pre["std"]],
    )
    runtime.info = dataclasses.replace(runtime.info, data=data)
    return runtime


def by_hand(folder: Path, paths: list[str], form: str, clean: Clean) -> list[tuple[str, int]]:
    """(class, exit) per file from plain ONNX Runtime sessions on the folder's graphs as they
    are, with the rule applied here: threshold 0 (the clean exports'), so `auto` on two images
    runs static.onnx, `single` calls single.onnx per image, `split` chains the pieces and an
    image leaves where its score is below 0."""
    info = clean.runtime.info.data
    pixels = np.stack([read_image(p, info.in_channels, info.input_size)[0] for p in paths])
    x = np.asarray(normalize_images(pixels, info.mean, info.std), dtype=np.float32)

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    if form == "auto":
        static = session("static.onnx")
        (logits,) = static.run(None, {static.get_inputs()[0].name: x})
        return [(clean.runtime.classes[int(np.argmax(z))], 3) for z in logits]
    if form == "single":
        single, cut = session("single.onnx"), np.zeros(2, np.float32)
        answers = []
        for j in range(len(x)):
            logits, exit_at = single.run(None, {"image": x[j : j + 1], "thresholds": cut})
            answers.append((clean.runtime.classes[int(np.argmax(logits[0]))], int(exit_at[0])))
        return answers
    answers: list[tuple[str, int] | None] = [None] * len(x)
    active, features = np.arange(len(x)), x
    for k in range(3):
        s = session(f"exit{k + 1}.onnx")
        out = s.run(None, {s.get_inputs()[0].name: features})
        logits = out[0] if k == 2 else out[1]
        done = np.ones(len(active), bool) if k == 2 else out[2] < 0
        for j in np.flatnonzero(done):
            answers[active[j]] = (clean.runtime.classes[int(np.argmax(logits[j]))], k + 1)
        if k < 2:
            active, features = active[~done], out[0][~done]
        if not len(active):
            break
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["manifest.json", *GRAPHS, "DEPLOY.md"])
@EXAMPLES
@given(data=st.data())
def test_damaged_export_files_are_reported_or_harmless(
    clean, digits, tmp_path_factory, capfd, name, data
):
    _, paths = digits
    source = clean[data.draw(st.sampled_from(sorted(clean)))]
    hows = {
        "manifest.json": ["truncate", "flip", "json", "nested"],
        "DEPLOY.md": ["truncate", "flip"],
    }
    how = data.draw(st.sampled_from(hows.get(name, ["truncate", "flip", "resign"])))
    form = data.draw(st.sampled_from(FORMS))
    folder = tmp_path_factory.mktemp("case") / "export"
    shutil.copytree(source.folder, folder)
    path = folder / name
    if how == "json":
        path.write_text(json.dumps(mutate_json(json.loads(path.read_text()), data.draw)))
    elif how == "nested":
        path.write_text(nest_json(json.loads(path.read_text()), data.draw))
    else:
        path.write_bytes(damage(path.read_bytes(), "flip" if how == "resign" else how, data.draw))
    if how == "resign":
        resign(folder, name)

    code, out, err = run(["infer", str(folder), *paths, *options(form)])
    check(code, err)
    event(f"{how}: exit {code}")
    assert "onnxruntime" not in capfd.readouterr().err  # its own log lines, beside erde's one
    if name == "static.onnx":  # loaded on its own too, as `erde bench` does
        try:
            export_session(folder, read_manifest(folder).static, threads=1)
        except ErdeError as exc:  # refused on its own: `erde infer` refused it, with that line
            assert code == 2 and " ".join(str(exc).split()) in err, err
        else:
            assert how == "resign" or path.read_bytes() == (source.folder / name).read_bytes()
    try:  # the loader `erde infer` uses
        rows = EarlyExitRuntime.from_export(folder, threads=1).classify_files(paths, form=form)
    except ErdeError as exc:
        assert code == 2 and " ".join(str(exc).split()) in err, err
        return
    assert code == 0, err
    if how == "resign":  # the graph the manifest vouches for answers: what it answers, by hand
        assert [(r.class_name, r.exit) for r in rows] == by_hand(folder, paths, form, source)
        return
    before = json.loads((source.folder / "manifest.json").read_text())
    manifest = json.loads(path.read_bytes()) if name == "manifest.json" else before
    if any(json.dumps(declared(manifest, k)) != json.dumps(declared(before, k)) for k in DECLARED):
        assert rows == under_declarations(source, manifest).classify_files(paths, form=form)
    else:
        assert rows == source.rows[form]
        assert out == source.stdout[form]
