"""A user's own exit rule: `erde.register_policy` in a module of their own, through evaluate,
compare, export and `erde infer`, and the mistakes a plugin can make.

The plugin is a file this module writes (Gini impurity of the softmax, normalised by its
maximum 1 - 1/K), imported with `--policy-module`. `erde infer` runs in a process that cannot
import it: the score is traced into the exported graph, so the runtime needs the name only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch
from PIL import Image
from safetensors.numpy import load_file

from erde.cli.main import main
from erde.config.schema import load_config, load_reproduce_config
from erde.data.prepare import prepare_data
from erde.deploy import export_run
from erde.errors import ErdeError
from erde.evaluation.policies import get_policy, register_policy
from erde.evaluation.policy import confidence_scores, simulate
from erde.run.layout import RunDir
from erde.study.reproduce import reproduce

SRC = Path(__file__).resolve().parents[1] / "src"
MODULE = "erde_gini_policy"
PLUGIN = '''
import torch

import erde


def gini(logits: torch.Tensor) -> torch.Tensor:
    """1 - sum p^2: 0 for a one-hot softmax, 1 - 1/K for a flat one."""
    p = torch.softmax(logits, dim=-1)
    return 1 - (p * p).sum(dim=-1)


erde.register_policy(
    "gini", gini, help="Gini impurity of the softmax", normalizer=lambda k: 1 - 1 / k
)
'''
N_IMAGES = 120
TIE = 1e-4  # ONNX Runtime and float64 numpy scores this close to a threshold may differ


def numpy_exits(logits: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """1-based exit per image under `score < threshold` with the normalised Gini score, from
    float64 softmax, and a mask of images whose score at an exit they reach ties the threshold."""
    p = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    k = logits.shape[-1]
    scores = (1 - (p**2).sum(axis=-1)) / (1 - 1 / k)
    below = scores[:, :-1] < threshold
    exits = np.where(below.any(axis=1), below.argmax(axis=1), logits.shape[1] - 1) + 1
    reached = np.arange(logits.shape[1] - 1)[None, :] < exits[:, None]
    tie = ((np.abs(scores[:, :-1] - threshold) < TIE) & reached).any(axis=1)
    return exits, tie


def spread_threshold(logits: np.ndarray) -> float:
    """A threshold between two exit-1 scores far apart, near their 40 % quantile, so that some
    images leave at exit 1 and the others go on."""
    p = scipy.special.softmax(logits[:, 0].astype(np.float64), axis=-1)
    k = logits.shape[-1]
    s = np.sort((1 - (p**2).sum(axis=-1)) / (1 - 1 / k))
    gaps = [(i, s[i + 1] - s[i]) for i in range(len(s) // 4, 3 * len(s) // 4)]
    i = max(gaps, key=lambda g: g[1])[0]
    return float((s[i] + s[i + 1]) / 2)


def files_of(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def erde(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m erde` in a fresh process that sees this checkout, and not the plugin."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "erde", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.mark.slow
def test_a_plugin_policy_flows_to_infer_with_the_simulators_exits(teacher, plugin, tmp_path):
    run = teacher
    module = ["--policy-module", MODULE]
    gini = ["--policy", "gini", "--normalize"]
    assert main(["evaluate", str(run), *gini, *module, "--replace-export"]) == 0
    report = RunDir(run).eval.report_md.read_text(encoding="utf-8")
    assert "gini (normalised)" in report
    assert main(["compare", str(run), *gini, *module, "--out", str(tmp_path / "cmp")]) == 0
    comparison = (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
    assert "exit score (gini, lower" in comparison

    # Without the plugin, export is refused in one line that names the fix; nothing changes.
    before = files_of(run)
    failed = erde(["export", str(run), "--out", str(tmp_path / "refused")], tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "unknown exit policy 'gini'" in failed.stderr
    assert "--policy-module MODULE" in failed.stderr
    assert files_of(run) == before and not (tmp_path / "refused").exists()

    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export), *module]) == 0
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["exits"]["policy"], manifest["exits"]["normalize"]) == ("gini", True)
    assert manifest["exits"]["score"] == "the plugin exit policy 'gini' (normalize=true)"

    # Test images as PNG files (lossless), and their exits from the saved logits, in numpy.
    data = prepare_data(load_config(str(run / "config.yaml"))).data
    logits = load_file(RunDir(run).logits)["test/logits"][:N_IMAGES]
    paths = []
    for k in range(N_IMAGES):
        paths.append(tmp_path / "images" / f"{k:03d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(data.test_x[k, :, :, 0].numpy(), "L").save(paths[-1])
    spread = spread_threshold(logits)
    for threshold in (None, spread):
        chosen = manifest["exits"]["threshold"] if threshold is None else threshold
        want, tie = numpy_exits(logits, chosen)
        simulated = simulate(torch.from_numpy(logits), chosen, "gini", normalize=True)[0]
        assert np.array_equal(simulated.numpy()[~tie] + 1, want[~tie])
        option = [] if threshold is None else ["--threshold", repr(threshold)]
        done = erde(
            ["infer", str(export), str(paths[0].parent), "--format", "json", *option], tmp_path
        )
        assert done.returncode == 0, done.stderr
        got = np.array([row["exit"] for row in json.loads(done.stdout)])
        assert tie.sum() <= 2
        assert np.array_equal(got[~tie], want[~tie]), f"{(got != want).sum()} exits differ"
    assert len(set(numpy_exits(logits, spread)[0])) >= 2  # the threshold splits the images


def test_a_policy_module_that_cannot_be_imported_is_one_line(teacher, tmp_path, capsys):
    before = files_of(teacher)
    broken = tmp_path / "erde_broken_policy.py"
    broken.write_text("import torch\nraise RuntimeError('no GPU here')\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        for module, problem in (
            ("erde_no_such_policy", "ModuleNotFoundError"),
            ("erde_broken_policy", "RuntimeError: no GPU here"),
        ):
            for command in (["evaluate", str(teacher)], ["export", str(teacher), "--out", "x"]):
                capsys.readouterr()
                assert main([*command, "--policy", "gini", "--policy-module", module]) == 2
                err = capsys.readouterr().err
                assert err.count("\n") == 1 and f"module {module!r} failed to import" in err
                assert problem in err and "PYTHONPATH" in err
    finally:
        sys.path.remove(str(tmp_path))
    assert files_of(teacher) == before


def test_reproduce_refuses_an_unknown_policy_before_any_run(tmp_path):
    cfg = load_reproduce_config("quickstart", ["evaluate.policy=top3"])
    with pytest.raises(ErdeError, match=r"unknown exit policy 'top3'.*evaluate.module"):
        reproduce(cfg, tmp_path / "study")
    cfg = load_reproduce_config("quickstart", ["evaluate.module=erde_no_such_policy"])
    with pytest.raises(ErdeError, match="'erde_no_such_policy' failed to import"):
        reproduce(cfg, tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_an_installed_entry_point_registers_its_policy_on_first_use(tmp_path):
    """An installed distribution (its .dist-info on sys.path, as pip leaves it) declaring an
    `erde.policies` entry point: the name is found with no module named anywhere."""
    (tmp_path / "erde_ep_rules.py").write_text(
        "import erde\n"
        "erde.register_policy('ep-rule', lambda z: z.softmax(-1).amin(-1), help='from an entry')\n",
        encoding="utf-8",
    )
    info = tmp_path / "erde_ep_rules-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: erde-ep-rules\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[erde.policies]\nrules = erde_ep_rules\n")
    code = (
        "from erde.evaluation.policies import get_policy, policy_names\n"
        "print(get_policy('ep-rule').help, policy_names())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SRC}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "from an entry ['entropy', 'maxprob', 'margin', 'ep-rule']"


def branch_on_values(logits: torch.Tensor) -> torch.Tensor:
    """Right in eager mode, but a Python branch on a tensor's value: no graph can hold it."""
    p = logits.softmax(dim=-1)
    return 1 - p.amax(dim=-1) if float(p.max()) > 0.5 else 1 - p.amin(dim=-1)


def loop_over_images(logits: torch.Tensor) -> torch.Tensor:
    """Right in eager mode; the exporter unrolls the loop for the example's batch size."""
    rows = logits.reshape(-1, logits.shape[-1])
    return torch.stack([1 - r.softmax(dim=-1).max() for r in rows]).reshape(logits.shape[:-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "fn", "problem"),
    [
        ("plugin-branch", branch_on_values, "could not be traced with the exit policy"),
        ("plugin-loop", loop_over_images, "fails on a batch of 3"),
    ],
)
def test_a_policy_the_graph_cannot_hold_is_refused_at_export(teacher, tmp_path, name, fn, problem):
    register_policy(name, fn, help="eager only")
    before = files_of(teacher)
    with pytest.raises(ErdeError) as info:
        export_run(teacher, tmp_path / "export", threshold=0.5, policy=name)
    message = str(info.value)
    assert "\n" not in message and message.startswith("exit 1's ONNX graph") and problem in message
    assert f"{name!r} (test_policy_plugin)" in message and "tensor operations only" in message
    assert files_of(teacher) == before and not (tmp_path / "export").exists()


def per_class(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)  # one score per class, not per image


def nan_on_extremes(logits: torch.Tensor) -> torch.Tensor:
    p = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)  # overflows at 1e4
    return 1 - p.amax(dim=-1)


def raises(logits: torch.Tensor) -> torch.Tensor:
    raise ValueError("expected 2 dimensions")


@pytest.mark.parametrize(
    ("name", "fn", "message"),
    [
        ("entropy", lambda z: z.sum(-1), "exit policy 'entropy' .* is a built-in exit policy"),
        ("margin", lambda z: z.sum(-1), "is a built-in exit policy .*another name"),
        ("plugin-per-class", per_class, r"gave \(4, 3, 5\) .* not one score per image"),
        ("plugin-nan", nan_on_extremes, "not finite"),
        ("plugin-raises", raises, "raised ValueError: expected 2 dimensions"),
        ("Top 3", lambda z: z.sum(-1), "name 'Top 3' is not allowed"),
    ],
)
def test_bad_plugin_policies_are_refused_at_registration(name, fn, message):
    with pytest.raises(ErdeError, match=message) as info:
        register_policy(name, fn, help="bad")
    assert "\n" not in str(info.value)
    if name in ("entropy", "margin"):
        assert get_policy(name).score is not fn  # the built-in stays
        return
    with pytest.raises(ErdeError, match="unknown exit policy"):
        get_policy(name)


def test_a_registered_name_is_taken_once():
    def low(logits: torch.Tensor) -> torch.Tensor:
        return logits.amax(dim=-1) * 0

    register_policy("plugin-once", low, help="always exits")
    assert get_policy("plugin-once").score is low
    with pytest.raises(ErdeError, match=r"'plugin-once' .* is already registered"):
        register_policy("plugin-once", low, help="again")


def listed(logits: torch.Tensor) -> list[float]:
    return [0.0]  # not a tensor


def smallest(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).amin(-1)


def where(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def refusal(name: str, fn, problem: str) -> str:
    return (
        f"exit policy {name!r} ({where(fn)}) {problem} on a probe batch; make it return one "
        "finite score per image (shape logits.shape[:-1]), lower = more confident"
    )


@pytest.mark.parametrize(
    ("name", "fn", "problem"),
    [
        (
            "plugin-shape",
            per_class,
            "gave (4, 3, 5) for logits of shape (4, 3, 5), not one score per image and exit (4, 3)",
        ),
        (
            "plugin-list",
            listed,
            "gave <class 'list'> for logits of shape (4, 3, 5), not one score per image and exit "
            "(4, 3)",
        ),
        ("plugin-nan-exact", nan_on_extremes, "gave scores that are not finite (NaN or infinite)"),
    ],
)
def test_a_refused_score_is_named_exactly(name, fn, problem):
    with pytest.raises(ErdeError) as caught:
        register_policy(name, fn, help="bad")
    assert str(caught.value) == refusal(name, fn, problem)


@pytest.mark.parametrize(
    ("name", "normalizer", "shown"),
    [
        ("plugin-norm-zero", lambda k: k - 5, "0"),
        ("plugin-norm-inf", lambda k: math.inf, "inf"),
        ("plugin-norm-negative", lambda k: -1.0, "-1.0"),
        ("plugin-norm-text", str, "'5'"),
    ],
)
def test_a_normalizer_that_is_no_positive_number_at_k_5_is_refused(name, normalizer, shown):
    with pytest.raises(ErdeError) as caught:
        register_policy(name, smallest, help="bad", normalizer=normalizer)
    problem = f"has normalizer(5) = {shown}, not a positive number"
    assert str(caught.value) == refusal(name, smallest, problem)


def test_a_normalizer_below_1_is_a_positive_number():
    register_policy("plugin-norm-half", smallest, help="halved", normalizer=lambda k: 0.5)
    assert get_policy("plugin-norm-half").normalizer(5) == 0.5


def test_a_name_taken_twice_names_both_functions():
    register_policy("plugin-twice", smallest, help="first")
    with pytest.raises(ErdeError) as caught:
        register_policy("plugin-twice", listed, help="second")
    assert str(caught.value) == (
        f"exit policy 'plugin-twice' ({where(listed)}) is already registered ({where(smallest)}); "
        "register yours under another name"
    )


def infinite_past_1e5(logits: torch.Tensor) -> torch.Tensor:
    """Finite on the probe batch (|logits| <= 1e4), infinite on larger logits."""
    big = logits.abs().amax(dim=-1) > 1e5
    inf = torch.full_like(big, math.inf, dtype=logits.dtype)
    return torch.where(big, inf, logits.amin(-1) ** 2)


def test_a_policy_not_finite_past_its_probe_is_refused_where_it_scores():
    register_policy("plugin-inf-late", infinite_past_1e5, help="inf on large logits")
    logits = torch.zeros(2, 2, 3)
    logits[1, 0, 0] = 2e5
    with pytest.raises(ErdeError) as caught:
        confidence_scores(logits, "plugin-inf-late")
    assert str(caught.value) == (
        "the exit policy 'plugin-inf-late' gave scores that are not finite for finite logits; "
        "fix the policy's function so that every score is a finite number"
    )
    finite = confidence_scores(torch.zeros(2, 2, 3), "plugin-inf-late")
    assert torch.equal(finite, torch.zeros(2, 2))
