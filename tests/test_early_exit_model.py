"""`EarlyExitModel`: a round trip through `save_pretrained` answers as the model did."""

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from erde.cli.main import main
from erde.deploy.early_exit_model import EarlyExitModel
from erde.errors import ErdeError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(teacher, tmp_path_factory):
    """The teacher with a val-chosen threshold above 0 (half the MACs as the budget)."""
    run = tmp_path_factory.mktemp("model") / "teacher"
    shutil.copytree(teacher, run)
    assert main(["evaluate", str(run), "--budget", "0.5", "--out", str(run / "eval")]) == 0
    return run


def images() -> np.ndarray:
    return (load_digits().images[:200] * 255 / 16).astype(np.uint8)[..., None]


def test_save_pretrained_keeps_the_exit_rule_it_was_chosen_with(evaluated, tmp_path):
    report = json.loads((evaluated / "eval" / "report.json").read_text())
    model = EarlyExitModel.from_pretrained(evaluated)
    assert model.threshold == report["chosen"]["threshold"] > 0
    assert "report.json" in model.rule_source
    before = model.predict(images())
    assert before.exits != model.predict(images(), threshold=0).exits  # the rule matters

    model.save_pretrained(tmp_path / "saved")
    again = EarlyExitModel.from_pretrained(tmp_path / "saved")
    assert (again.threshold, again.policy, again.normalize) == (
        model.threshold,
        model.policy,
        model.normalize,
    )
    assert again.rule_source == model.rule_source
    after = again.predict(images())
    assert (after.exits, after.labels) == (before.exits, before.labels)


def test_a_saved_rule_is_refused_beside_other_weights(evaluated, tmp_path):
    EarlyExitModel.from_pretrained(evaluated).save_pretrained(tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights))
    with pytest.raises(ErdeError, match="chosen for other weights") as caught:
        EarlyExitModel.from_pretrained(tmp_path / "saved")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": -1.0}, "field 'threshold'"),
        ({"policy": "Max prob"}, "field 'policy'"),
        ({"format_version": 9}, "has format version 9, this erde reads version 1"),
        ({"surprise": 1}, "field 'surprise'"),
        ({"weights_sha256": "abc"}, "field 'weights_sha256'"),
    ],
)
def test_a_damaged_rule_names_its_field(evaluated, tmp_path, change, message):
    EarlyExitModel.from_pretrained(evaluated).save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "exit_rule.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ErdeError, match=message) as caught:
        EarlyExitModel.from_pretrained(tmp_path / "saved")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_deeply_nested_rule_is_one_line_not_a_recursion_error(evaluated, tmp_path):
    EarlyExitModel.from_pretrained(evaluated).save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "exit_rule.json"
    assert json.loads(path.read_text())["format_version"] == 1
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ErdeError, match="not JSON \\(recursion limit exceeded") as caught:
        EarlyExitModel.from_pretrained(tmp_path / "saved")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_report_is_deployed_only_with_the_weights_it_was_computed_from(
    evaluated, teacher, tmp_path, capsys
):
    other = tmp_path / "other"  # another run of the same data, evaluated into `other/eval` ...
    shutil.copytree(teacher, other)
    weights = other / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] * 0.5
    save_file(tensors, str(weights))
    # ... by mistake with the first run's report (`erde evaluate A --out B/eval`)
    assert main(["evaluate", str(evaluated), "--budget", "0.5", "--out", str(other / "eval")]) == 0
    capsys.readouterr()
    with pytest.raises(ErdeError, match="was computed from other weights than"):
        EarlyExitModel.from_pretrained(other)
    assert main(["export", str(other), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "was computed from other weights" in err and f"erde evaluate {other}" in err
    assert not (tmp_path / "export").exists()
    report = other / "eval" / "report.json"  # a report that does not say (an older erde's)
    raw = json.loads(report.read_text())
    raw.pop("weights_sha256")
    report.write_text(json.dumps(raw))
    with pytest.raises(ErdeError, match="does not say which weights"):
        EarlyExitModel.from_pretrained(other)
    again = ["evaluate", str(other), "--budget", "0.5", "--out", str(other / "eval")]
    assert main(again) == 0  # the fix the message names (with the criterion of that report)
    assert EarlyExitModel.from_pretrained(other).threshold > 0


def test_both_python_classes_read_an_array_by_one_rule(evaluated, tmp_path):
    """uint8 is raw pixels (three layouts), float32 normalised, anything else, NaN and a
    threshold given as text refused with one line; an empty batch gives an empty answer."""
    from erde.deploy import EarlyExitRuntime, export_run
    from erde.deploy.images import normalize_images

    export_run(evaluated, tmp_path / "export")
    model = EarlyExitModel.from_pretrained(evaluated)
    runtimes = [EarlyExitRuntime.from_export(tmp_path / "export", threads=1)]
    runtimes.append(EarlyExitRuntime.from_run(evaluated))
    pixels = images()[:20]  # N x 8 x 8 x 1
    d = model.info.data
    want = model.predict(normalize_images(pixels, d.mean, d.std)).labels
    layouts = [pixels, pixels[..., 0], pixels.transpose(0, 3, 1, 2)]
    for layout in layouts:
        assert model.predict(layout).labels == want
        for rt in runtimes:
            assert rt.predict(layout).labels.tolist() == want
    nan = np.full((1, 1, 8, 8), np.nan, np.float32)
    refused = [pixels.astype(np.int64), pixels.astype(np.float64), pixels > 0]
    refused += [pixels.transpose(0, 3, 1, 2).astype(np.complex64), nan]
    for predict in [model.predict] + [rt.predict for rt in runtimes]:
        for x in refused:
            with pytest.raises(ErdeError, match="images") as caught:
                predict(x)
            assert "\n" not in str(caught.value)
        with pytest.raises(ErdeError, match="real numbers"):
            predict(pixels, threshold="0.5")
    assert model.predict_files([]).labels == [] == model.predict(pixels[:0]).exits
    assert len(runtimes[0].predict(pixels[:0], form="single").labels) == 0
