"""Files written by the erde before format versions (tests/fixtures/formats_v1, from a 2-epoch
digits teacher and ERDE student, its evaluation and export) read through today's readers; newer
versions and damaged files are one-line refusals that name the file and the fix."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from erde.cli.main import main
from erde.deploy.manifest import read_manifest
from erde.errors import ErdeError
from erde.run.metrics import read_jsonl
from erde.run.model_info import ModelInfo
from erde.run.report import read_report
from erde.train.loggers import MetricsFile

V1 = Path(__file__).parent / "fixtures" / "formats_v1"


def plain(name: str):
    return json.loads((V1 / name).read_text())


def test_the_fixtures_are_of_the_formats_before_versions():
    for name in ("model.json", "report.json"):
        assert "format_version" not in plain(name)
    rows = [json.loads(line) for line in (V1 / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("format_version" not in row for row in rows)
    assert plain("manifest.json")["format_version"] == 3  # the manifest's own numbering


def test_a_version_1_model_json_reads_and_is_rewritten_with_its_version_precision_and_crop(
    tmp_path,
):
    raw = plain("model.json")
    info = ModelInfo.read(V1 / "model.json")
    assert info.exit_macs == raw["exit_macs"] == [306688, 529152, 750976]
    assert info.static_macs == raw["static_macs"]
    assert info.arch == raw["arch"] and info.name == "resnet8"
    assert info.data.classes == raw["data"]["classes"] and info.data.std == raw["data"]["std"]
    assert (info.method, info.teacher, info.pairing) == ("erde", raw["teacher"], [0, 1, 2])
    assert info.config == raw["config"] and info.finished is True
    info.write(tmp_path / "model.json")
    again = json.loads((tmp_path / "model.json").read_text())
    assert again.pop("format_version") == 3
    assert again.pop("precision") is None  # not recorded before: grouped by the setting
    assert again.pop("weights") is None  # no pretrained weights recorded: none
    assert raw["config"]["data"]["eval_crop"] == 1.0
    assert again["data"].pop("eval_crop") == 1.0  # the crop rule, from the run's config
    assert again == raw
    assert ModelInfo.read(tmp_path / "model.json") == info


def test_a_version_2_model_json_takes_its_crop_rule_from_its_config(tmp_path):
    raw = {**plain("model.json"), "format_version": 2}
    raw["config"] = {**raw["config"], "data": {**raw["config"]["data"], "eval_crop": 0.875}}
    (tmp_path / "model.json").write_text(json.dumps(raw))
    assert ModelInfo.read(tmp_path / "model.json").data.eval_crop == 0.875
    del raw["config"]["data"]["eval_crop"]  # a run from before the key: no crop
    (tmp_path / "model.json").write_text(json.dumps(raw))
    assert ModelInfo.read(tmp_path / "model.json").data.eval_crop == 1.0


def test_version_1_metrics_rows_read_and_are_rewritten_with_only_their_version_added(tmp_path):
    lines = (V1 / "metrics.jsonl").read_text().splitlines()
    raw = [json.loads(line) for line in lines]
    rows = read_jsonl(V1 / "metrics.jsonl")
    assert rows == raw and [r["epoch"] for r in rows] == [1, 2]
    assert isinstance(rows[0]["epoch"], int)
    written = MetricsFile(tmp_path / "metrics.jsonl")  # what `erde train` appends per epoch
    for row in rows:
        written.log(row)
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.pop("format_version") for r in again] == [2, 2]
    assert again == raw
    assert read_jsonl(tmp_path / "metrics.jsonl") == raw


def test_a_version_1_report_reads_and_is_rewritten_with_its_version_and_no_digest(tmp_path):
    raw = plain("report.json")
    report = read_report(V1 / "report.json")
    assert report.chosen.threshold == raw["chosen"]["threshold"] == pytest.approx(2.1572749)
    assert report.exit_macs == raw["exit_macs"]
    assert report.chosen_by == raw["chosen_by"]
    assert report.reference.label == raw["reference"]["label"]
    assert report.per_exit_accuracy == raw["per_exit_accuracy"]
    teacher_exits = [x["teacher_exit"] for x in raw["diagnostics"]["per_exit"]]
    assert [x.teacher_exit for x in report.diagnostics.per_exit] == teacher_exits  # kept as given
    assert report.at_budget_fraction["0.25"] is None
    assert (
        report.at_budget_fraction["0.5"].threshold == raw["at_budget_fraction"]["0.5"]["threshold"]
    )
    report.write(tmp_path / "report.json")
    again = json.loads((tmp_path / "report.json").read_text())
    assert again.pop("format_version") == 2
    assert again.pop("weights_sha256") is None  # a version-1 report did not say: never deployed
    assert again["diagnostics"].pop("teacher_wrong_images") is None  # nor how many, later added
    assert again == raw
    assert read_report(tmp_path / "report.json") == report


def test_a_version_3_manifest_reads_into_the_blocks_of_version_4(tmp_path):
    raw = plain("manifest.json")
    shutil.copy(V1 / "manifest.json", tmp_path / "manifest.json")
    manifest = read_manifest(tmp_path)
    assert manifest.deployment.threshold == raw["threshold"]
    assert manifest.deployment.policy == raw["policy"] == "entropy"
    assert manifest.info.exit_macs == raw["exit_macs"]
    assert manifest.info.data.classes == raw["classes"]
    assert manifest.info.data.source == raw["data_source"]
    assert manifest.info.data.eval_crop == 1.0  # version 3 knew no crop: evaluation's default
    assert [p["file"] for p in manifest.pieces] == ["exit1.onnx", "exit2.onnx", "exit3.onnx"]
    assert manifest.pieces == raw["pieces"] and manifest.single == raw["single"]
    assert manifest.budget_thresholds == raw["budget_thresholds"]
    assert manifest.val_curve is None
    again = manifest.to_json()
    assert again["format_version"] == 4
    p, e = again["preprocess"], again["exits"]
    assert (p["in_channels"], p["input_size"], p["channels"]) == (1, 8, "grey")
    assert (p["mean"], p["std"]) == (raw["mean"], raw["std"])
    assert (p["resize"]["to"], p["crop"]["size"], p["crop"]["fraction"]) == (8, 8, 1.0)
    assert (e["count"], e["macs"], e["static_macs"]) == (3, raw["exit_macs"], raw["static_macs"])
    assert (e["threshold"], e["policy"], e["normalize"]) == (raw["threshold"], "entropy", False)
    moved = {"mean", "std", "input_size", "in_channels", "threshold", "policy", "normalize"}
    moved |= {"exit_macs", "static_macs", "format_version"}
    kept = {k: v for k, v in raw.items() if k not in moved}
    for key in ("pieces", "static", "single"):  # the tensors gain their meaning
        names = lambda entries: [[t["name"] for t in x["inputs"] + x["outputs"]] for x in entries]  # noqa: E731
        listed = again[key] if key == "pieces" else [again[key]]
        assert names(listed) == names(kept[key] if key == "pieces" else [kept[key]])
        kept.pop(key)
    assert {k: again[k] for k in kept} == kept
    (tmp_path / "manifest.json").write_text(json.dumps(again))  # and reads back the same
    assert read_manifest(tmp_path) == dataclasses.replace(
        manifest,
        pieces=again["pieces"],
        static=again["static"],
        single=again["single"],
    )


def write_version(tmp_path: Path, name: str, version) -> Path:
    """The fixture `name` in a folder of its own, claiming `version`."""
    path = tmp_path / name
    if name == "metrics.jsonl":
        rows = [{**json.loads(line), "format_version": version} for line in
                (V1 / name).read_text().splitlines()]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps({**plain(name), "format_version": version}))
    return path


READERS = {
    "model.json": (ModelInfo.read, "erde train"),
    "metrics.jsonl": (read_jsonl, "--overwrite"),
    "report.json": (read_report, "erde evaluate RUN --refresh"),
    "manifest.json": (lambda path: read_manifest(path.parent), "erde export RUN --out DIR"),
}


@pytest.mark.parametrize("name", READERS)
def test_a_newer_format_version_is_refused_in_one_line_with_the_fix(tmp_path, name):
    read, fix = READERS[name]
    path = write_version(tmp_path, name, 99)
    with pytest.raises(ErdeError) as raised:
        read(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and fix in message
    assert "has format version 99, this erde reads version" in message


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("version", ["2", True, None, 0])
def test_a_version_that_is_no_known_number_is_refused(tmp_path, name, version):
    read, fix = READERS[name]
    path = write_version(tmp_path, name, version)
    with pytest.raises(ErdeError) as raised:
        read(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and fix in message


def test_a_retired_manifest_version_names_the_re_export(tmp_path):
    write_version(tmp_path, "manifest.json", 2)
    with pytest.raises(ErdeError, match="has format version 2, this erde reads version 4; re-"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("name", READERS)
def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path, name):
    read, _ = READERS[name]
    path = tmp_path / name
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ErdeError) as raised:
        read(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "recursion limit" in message


def test_the_command_line_refuses_a_newer_sidecar_with_status_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    write_version(run, "model.json", 4)
    assert main(["train", "digits-teacher", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{run / 'model.json'} has format version 4, this erde reads version 3" in err[0]


def test_the_command_line_refuses_a_newer_manifest_with_status_2(tmp_path, capsys):
    write_version(tmp_path, "manifest.json", 5)
    assert main(["infer", str(tmp_path), str(tmp_path / "image.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "has format version 5, this erde reads version 4" in err[0]
