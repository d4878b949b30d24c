"""A method registered by the user's own package (`erde.register_method`), named by
`distill.module`, flows through train, evaluate, compare and tune in fresh processes, with no
edit to erde; a plugin that declares something wrong, or cannot be imported, is one line."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from erde.config.methods import METHOD_TABLE, MethodKey, register_method
from erde.config.records import Range
from erde.distill.losses import make_loss
from erde.errors import ErdeError

# A confidence-weighted KD: the KL to the teacher, each image weighted by the teacher's top
# probability to the power `power` (its own key), plus the label term every method has.
PLUGIN = '''
import torch.nn.functional as F

import erde


def confidence_weighted_kd(student, labels, teacher, ctx):
    """(1 - alpha) * T^2 * KL(teacher || student) at temperature T, times max p_teacher^power."""
    t = ctx.temperature
    log_p, log_q = F.log_softmax(teacher / t, dim=1), F.log_softmax(student / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1) * t * t
    weight = F.softmax(teacher, dim=1).max(dim=1).values ** ctx.options["power"]
    return (1 - ctx.alpha) * weight * kl


erde.register_method(
    "kd-conf",
    terms=["ce"],
    loss=confidence_weighted_kd,
    teacher=True,
    keys={
        "power": erde.MethodKey(
            1.0,
            "exponent of the teacher confidence weighing each image's KL",
            range=erde.Range(0),
            search=erde.Search(0.5, 3.0),
        )
    },
)
'''
MODULE = "my_methods.methods"
FAST = ["model.name=resnet8", "train.epochs=1", "train.warmup_epochs=0", "--no-progress"]


def write_plugin(root, text=PLUGIN):
    pkg = root / "site" / "my_methods"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods.py").write_text(textwrap.dedent(text))
    return root / "site"


def erde(tmp_path, *args, site=True, trust=MODULE):
    paths = [str(tmp_path / "site")] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *sys.path])}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ERDE_TRUST_MODULES", None)
    if trust:
        env["ERDE_TRUST_MODULES"] = trust
    return subprocess.run(
        [sys.executable, "-m", "erde", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )


def digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def one_line_error(done, *parts):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_the_plugin_loss_is_its_own_term_over_the_label_term(tmp_path, monkeypatch):
    """In-process: the registered term enters the total exactly as the plugin computes it,
    checked against a hand computation of the same formula."""
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path)))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    monkeypatch.setattr("erde.config.methods.METHOD_TABLE", dict(METHOD_TABLE))
    __import__(MODULE)
    torch.manual_seed(0)
    student = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss = make_loss("kd-conf", num_exits=2, alpha=0.3, temperature=2.0, options={"power": 2.0})
    result = loss(student, labels, teacher)
    want = 0.0
    for s, t in zip(student, teacher, strict=True):
        p, q = (t / 2).softmax(1), (s / 2).softmax(1)
        kl = (p * (p / q).log()).sum(1) * 4
        weight = t.softmax(1).max(1).values ** 2
        want += 0.3 * F.cross_entropy(s, labels) + (0.7 * weight * kl).mean()
    assert result.total.item() == pytest.approx(want.item(), rel=1e-12)
    assert result.components["own"].item() == pytest.approx(
        result.total.item() - result.components["ce"].item(), rel=1e-12
    )
    with pytest.raises(ErdeError, match=r"distill.options.power=-1.0 must be >= 0"):
        make_loss("kd-conf", num_exits=2, options={"power": -1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"terms": ["ce", "kdd"]}, "names the loss term 'kdd'; erde's terms are ce, kd, "),
        ({"terms": ["ce", "kd"], "teacher": False}, "read a teacher; drop them or set teacher"),
        ({"terms": []}, "has no loss: name erde's terms"),
        ({"keys": {"alpha": MethodKey(0.5, "x")}}, "'alpha', which is erde's own distill.alpha"),
        ({"keys": {"w": MethodKey(-1.0, "x", range=Range(0))}}, "default of key 'w'"),
    ],
)
def test_a_plugin_that_declares_something_wrong_is_refused(kwargs, message):
    before = dict(METHOD_TABLE)
    with pytest.raises(ErdeError, match="method 'mine'") as caught:
        register_method("mine", **kwargs)
    assert message in str(caught.value)
    with pytest.raises(ErdeError, match="already registered by erde; give yours another name"):
        register_method("kd", terms=["ce"])
    assert before == METHOD_TABLE


def test_a_bad_plugin_module_stops_train_with_one_line(tmp_path):
    write_plugin(tmp_path, PLUGIN.replace('terms=["ce"]', 'terms=["ce", "kl"]'))
    done = erde(tmp_path, "train", "digits-student", "distill.method=kd-conf",
                f"distill.module={MODULE}", "distill.teacher=t", "--out", "run")  # fmt: skip
    one_line_error(done, f"distill.module='{MODULE}'", "'kl'", "fix the name")
    assert not (tmp_path / "run").exists()
    write_plugin(tmp_path)
    done = erde(tmp_path, "train", "digits-student", "distill.method=kd-conf",
                f"distill.module={MODULE}", "distill.teacher=t", "distill.options.pow=2",
                "--out", "run")  # fmt: skip
    one_line_error(done, "distill.options.pow", "its keys are power")


def test_an_entry_point_method_is_found_without_naming_its_module(tmp_path):
    site = write_plugin(tmp_path)
    info = site / "my_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[erde.methods]\nmy_methods = {MODULE}\n")
    done = erde(tmp_path, "config", "digits-student", "distill.method=kd-conf",
                "distill.teacher=t", "distill.options.power=3", trust=None)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "power: 3.0  # float, >= 0: kd-conf:" in done.stdout


@pytest.mark.slow
def test_a_plugin_method_trains_evaluates_compares_and_tunes(tmp_path):
    write_plugin(tmp_path)
    plugin = ["distill.method=kd-conf", f"distill.module={MODULE}", "distill.teacher=teacher"]
    done = erde(tmp_path, "config", "digits-student", *plugin)
    assert done.returncode == 0, done.stderr
    assert "power: 1.0  # float, >= 0: kd-conf: exponent of the teacher" in done.stdout
    assert "kd-conf" in done.stdout.split("method:")[1].splitlines()[0]  # a registered choice

    assert erde(tmp_path, "train", "digits-teacher", *FAST, "--out", "teacher").returncode == 0
    runs = {
        "kd-conf": [*plugin, "distill.options.power=2"],
        "kd": ["distill.method=kd", "distill.teacher=teacher"],
    }
    for name, overrides in runs.items():
        done = erde(tmp_path, "train", "digits-student", *overrides, *FAST, "--out", name)
        assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "kd-conf" / "model.json").read_text())
    assert meta["method"] == "kd-conf"
    assert meta["config"]["distill"]["options"] == {"power": 2.0}
    lines = (tmp_path / "kd-conf" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert rows[0]["train/own"] > 0  # the plugin's term was trained on

    # A fresh process imports the run's module again, only when trusted.
    done = erde(tmp_path, "evaluate", "kd-conf", trust=None)
    one_line_error(done, "method module 'my_methods.methods'", "ERDE_TRUST_MODULES=")
    done = erde(tmp_path, "evaluate", "kd-conf")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "kd-conf" / "eval" / "report.json").read_text())
    assert report["method"] == "kd-conf"

    done = erde(tmp_path, "compare", "teacher", "kd", "kd-conf", "--out", "cmp")
    assert done.returncode == 0, done.stderr
    groups = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["groups"]
    assert set(groups) == {"teacher (resnet8)", "kd (resnet8)", "kd-conf (resnet8)"}

    # The module gone: evaluate and compare stop with one line, the runs untouched.
    before = digests(tmp_path / "kd-conf")
    for args in (["evaluate", "kd-conf"], ["compare", "teacher", "kd-conf", "--out", "cmp2"]):
        done = erde(tmp_path, *args, site=False)
        one_line_error(done, f"distill.module='{MODULE}'", "install the package or put it on")
    assert digests(tmp_path / "kd-conf") == before
    assert not (tmp_path / "cmp2").exists()

    # The tuner searches the method's own key beside erde's.
    tiny = ["teacher.model.name=resnet8", "teacher.train.epochs=1", "student.train.epochs=1",
            "teacher.train.warmup_epochs=0", "student.train.warmup_epochs=0",
            f"distill.module={MODULE}", "--no-progress"]  # fmt: skip
    done = erde(tmp_path, "tune", "--preset", "quickstart", *tiny, "methods=[kd-conf]",
                "--trials", "1", "--out", "study")  # fmt: skip
    assert done.returncode == 0, done.stderr
    best = json.loads((tmp_path / "study" / "best.json").read_text())
    assert set(best["kd-conf"]["params"]) == {
        "distill.alpha",
        "distill.temperature",
        "distill.options.power",
    }
    trial = json.loads((tmp_path / "study" / "kd-conf" / "trial-0000" / "model.json").read_text())
    power = trial["config"]["distill"]["options"]["power"]
    assert power == best["kd-conf"]["params"]["distill.options.power"] and 0.5 <= power <= 3

    # The protocol trains and compares it beside erde's methods; the module the command line
    # names needs no trust to evaluate the runs it trained.
    done = erde(tmp_path, "reproduce", "--preset", "quickstart", *tiny, "methods=[kd,kd-conf]",
                "--teacher", "study/teacher", "--out", "proto", trust=None)  # fmt: skip
    assert done.returncode == 0, done.stderr
    groups = json.loads((tmp_path / "proto" / "comparison.json").read_text())["groups"]
    assert {g.split(",")[0] for g in groups} >= {"kd (resnet8)", "kd-conf (resnet8)"}
