"""Loading never runs code: pickle bombs, forged safetensors headers and code-calling configs are
refused with a message, and the payload never fires.

Each bomb is also opened the unsafe way at the end of its test, to prove it was live.
"""

import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from erde.cli.main import main
from erde.config.schema import load_config, load_reproduce_config
from erde.errors import ErdeError
from erde.train.engine import fit

CACHE = "logits.safetensors"  # the run-folder layout, spelled out independently of the code

FAST = ["model.name=resnet8", "train.batch_size=128", "data.crop_padding=1"]


class Bomb:
    """Unpickling it creates the file `marker`: a stand-in for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return code, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run and an unfinished one (epoch 1 of 2), trained once for the module."""
    root = tmp_path_factory.mktemp("safety")
    cfg = load_config("digits-student", [*FAST, "train.epochs=2"])
    fit(cfg, root / "finished", progress=False)
    fit(cfg, root / "unfinished", progress=False, stop_after=1)
    return root


def copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickle_bomb_state_is_refused_on_resume(runs, tmp_path, capsys, container):
    run = copy_run(runs / "unfinished", tmp_path / "run")
    marker = tmp_path / "marker"
    state = torch.load(run / "state.pt", weights_only=True)
    state["scaler"] = Bomb(marker)  # hidden one level down, beside the real entries
    if container == "torch.save":
        torch.save(state, run / "state.pt")
    else:
        (run / "state.pt").write_bytes(pickle.dumps(state, protocol=2))
    before = (run / "model.safetensors").read_bytes()

    code, err = run_cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    assert code == 2
    assert "is not a safe erde training state" in err and "--overwrite" in err
    assert not marker.exists()
    assert (run / "model.safetensors").read_bytes() == before

    # The unsafe way: the payload fires.
    if container == "torch.save":
        torch.load(run / "state.pt", weights_only=False)
    else:
        pickle.loads((run / "state.pt").read_bytes())
    assert marker.exists()


def safetensors_blob(header, data=b"\0" * 8, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32 = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
BOGUS_HEADERS = {
    "length beyond the file": safetensors_blob(F32, length=10**6),
    "length of 2**63": safetensors_blob(b"{}", length=2**63),
    "not JSON": safetensors_blob(b"\x00\xffnot json"),
    "offsets beyond the data": safetensors_blob(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}
    ),
    "unknown dtype": safetensors_blob(
        {"w": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}
    ),
    "shape overflowing memory": safetensors_blob(
        {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("blob", BOGUS_HEADERS.values(), ids=BOGUS_HEADERS.keys())
def test_forged_safetensors_header_is_refused(runs, tmp_path, capsys, blob):
    run = copy_run(runs / "finished", tmp_path / "run")
    (run / "model.safetensors").write_bytes(blob)
    code, err = run_cli(capsys, "evaluate", run)
    assert code == 2 and "is not a readable safetensors file" in err
    assert not (run / CACHE).exists() and not (run / "eval").exists()


@pytest.mark.slow
def test_forged_logits_cache_header_is_refused(runs, tmp_path, capsys):
    run = copy_run(runs / "finished", tmp_path / "run")
    (run / CACHE).write_bytes(BOGUS_HEADERS["offsets beyond the data"])
    code, err = run_cli(capsys, "evaluate", run)
    assert code == 2 and "logits cache" in err and "delete it" in err


def test_npz_with_pickled_objects_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    root = tmp_path / "npz"
    root.mkdir()
    for split in ("train", "test"):
        x = np.empty(2, dtype=object)
        x[:] = [Bomb(marker), Bomb(marker)]
        np.savez(root / f"{split}.npz", x=x, y=np.arange(2))
    code, err = run_cli(
        capsys,
        "train",
        "digits-student",
        "data.source=npz",
        f"data.root={root}",
        "--out",
        tmp_path / "run",
    )
    assert code == 2 and "non-object" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    with np.load(root / "train.npz", allow_pickle=True) as f:
        f["x"]  # the unsafe way: the payload fires
    assert marker.exists()


@pytest.mark.parametrize("verify", [False, True])
def test_cifar_batch_with_pickled_objects_is_refused(tmp_path, capsys, verify):
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    for name in names:
        batch = {
            "data": np.zeros((2, 3072), np.uint8),
            "labels": [0, 1],
            "filenames": [Bomb(marker), "b.png"],  # a key erde does not even use
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    code, err = run_cli(
        capsys,
        "train",
        "digits-student",
        "data.source=cifar10",
        f"data.root={tmp_path / 'cifar'}",
        f"data.verify={str(verify).lower()}",
        "--out",
        tmp_path / "run",
    )
    # Not the official files: verify=true stops at the md5 sums, verify=false reads them safely.
    message = "md5 mismatch" if verify else "erde never unpickles it"
    assert code == 2 and message in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    with open(folder / "data_batch_1", "rb") as fh:
        pickle.load(fh, encoding="latin1")  # the unsafe way (torchvision's): the payload fires
    assert marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"train:\n  lr: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ErdeError, match="not valid YAML"):
        load_config(str(path))
    assert not marker.exists()
    yaml.unsafe_load(path.read_text())  # the unsafe way: the payload fires
    assert marker.exists()


@pytest.fixture
def code_running_resolver(tmp_path):
    """A resolver some other code in the process registered, which runs code when called."""
    marker = tmp_path / "marker"
    OmegaConf.register_resolver("erde_test_touch", lambda: marker.write_text("x"))
    yield marker
    OmegaConf.clear_resolver("erde_test_touch")


@pytest.mark.parametrize(
    "value",
    [
        "${erde_test_touch:}",
        "${oc.env:ERDE_TEST_UNSET,${erde_test_touch:}}",
        "${ erde_test_touch :}",
    ],
)
def test_configs_cannot_call_resolvers(code_running_resolver, tmp_path, value):
    marker = code_running_resolver
    with pytest.raises(ErdeError, match="calls the resolver 'erde_test_touch'"):
        load_config("digits-student", [f"train.lr={value}"])
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({"student": {"train": {"lr": value}}}))
    with pytest.raises(ErdeError, match="calls the resolver"):
        load_reproduce_config(str(path))
    assert not marker.exists()
    assert OmegaConf.create({"lr": value}).lr in (1, "1")  # OmegaConf alone calls it
    assert marker.exists()


def test_environment_variables_and_key_references_resolve(monkeypatch):
    monkeypatch.setenv("ERDE_TEST_ROOT", "/data/cifar")
    monkeypatch.delenv("ERDE_TEST_UNSET", raising=False)
    cfg = load_config(
        "digits-student",
        [
            "data.root=${oc.env:ERDE_TEST_ROOT}",
            "train.eval_batch_size=${oc.env:ERDE_TEST_UNSET,256}",
            "train.gamma=${train.lr}",
        ],
    )
    assert cfg.data.root == "/data/cifar"
    assert cfg.train.eval_batch_size == 256
    assert cfg.train.gamma == cfg.train.lr == 0.1
    with pytest.raises(ErdeError, match="Environment variable 'ERDE_TEST_UNSET' not found"):
        load_config("digits-student", ["data.root=${oc.env:ERDE_TEST_UNSET}"])


def erde_process(*argv: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh Python started as users start it, in `cwd` (which Python puts on sys.path)."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    full.pop("ERDE_TRUST_MODULES", None)
    full.update(env or {})
    argv = [sys.executable, *argv]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=full)


def test_a_module_a_run_names_is_not_imported_unless_allowed(runs, tmp_path):
    run = copy_run(runs / "finished", tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["arch"]["module"] = "evilmod"
    (run / "model.json").write_text(json.dumps(meta))
    cwd, marker = tmp_path / "cwd", tmp_path / "marker"
    cwd.mkdir()
    (cwd / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    done = erde_process(
        "-m", "erde", "export", str(run), "--threshold", "1", "--out", str(tmp_path / "e1"), cwd=cwd
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "'evilmod'" in done.stderr and "ERDE_TRUST_MODULES=evilmod" in done.stderr
    api = f"from erde import EarlyExitModel; EarlyExitModel.from_pretrained({str(run)!r})"
    done = erde_process("-c", api, cwd=cwd)
    assert done.returncode != 0 and "ERDE_TRUST_MODULES" in done.stderr
    assert not marker.exists() and not (tmp_path / "e1").exists()
    allowed = {"ERDE_TRUST_MODULES": "other, evilmod"}
    done = erde_process("-c", api, cwd=cwd, env=allowed)
    assert done.returncode == 0, done.stderr
    assert marker.exists()


def test_a_module_a_resumed_run_names_is_not_imported_unless_allowed(runs, tmp_path):
    run = copy_run(runs / "unfinished", tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["module"] = "evilmod"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    cwd, marker = tmp_path / "cwd", tmp_path / "marker"
    cwd.mkdir()
    (cwd / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    done = erde_process("-m", "erde", "train", "--resume", "--out", str(run), cwd=cwd)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ERDE_TRUST_MODULES=evilmod" in done.stderr and not marker.exists()
