"""The command line as a user meets it: real commands, exit status 2 and one message on mistakes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from erde.cli.main import main
from erde.models import create_model, list_models
from erde.models.macs import macs_table


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_console_script_entry_point_runs():
    # The installed `erde` and `python -m erde` are the same program.
    out = subprocess.run(
        [sys.executable, "-m", "erde", "models"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert set(list_models()) <= set(names)


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_torchrun_worker_leaves_without_teardown_and_keeps_its_output(world_size):
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('interpreter torn down'))\n"
        "sys.argv = ['erde', *sys.argv[1:]]\n"
        "from erde.cli.main import command\n"
        "command()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size:
        env["WORLD_SIZE"] = world_size
    for argv, code in ((["models"], 0), (["config", "no-such-preset"], 2)):
        done = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env
        )
        assert done.returncode == code
        assert ("| resnet8" in done.stdout) if code == 0 else ("no-such-preset" in done.stderr)
        assert ("interpreter torn down" in done.stdout) == (world_size is None)


def test_models_lists_names_without_building_a_network(capsys, monkeypatch):
    built = []
    init = torch.nn.Module.__init__

    def counting_init(self, *args, **kwargs):  # the real constructor, counted
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    code, out, _ = run_cli(capsys, "models", "torchvision/*")
    assert code == 0 and built == []
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    # the biggest networks are listed by name, as torchvision lists them
    assert {"torchvision/vit_h_14", "torchvision/regnet_y_128gf", "torchvision/resnet50"} <= set(
        names
    )
    assert f"\n{len(names) - 1} models." in out  # the header row is not a model
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and built == []
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert names[1:] == list_models()
    namespaces = out.strip().splitlines()[-1]
    for words in ("erde's own", "plugins'", "timm/NAME", "torchvision/NAME", "'timm/*'"):
        assert words in namespaces


@pytest.mark.parametrize(("argv", "classes"), [([], 10), (["--num-classes", "100"], 100)])
def test_models_describes_one_model_and_says_for_how_many_classes(capsys, argv, classes):
    code, out, _ = run_cli(capsys, "models", "resnet20", *argv)
    header, _, row = out.strip().splitlines()
    assert code == 0 and f"params ({classes} classes, exit heads included)" in header
    net = create_model("resnet20", num_classes=classes)
    params = sum(p.numel() for p in net.parameters())  # every exit head with `classes` outputs
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:3] == ["resnet20", "erde", "3,6"] and cells[5] == f"{params / 1e6:.2f} M"
    rows = macs_table(net)  # the plain network: the last exit's MACs less the heads before it
    plain = rows[-1]["cumulative_macs"] - sum(r["head_macs"] for r in rows[:-1])
    assert cells[4] == f"{plain / 1e6:,.1f} M" == "40.6 M"


def test_a_reader_that_stops_ends_the_command_quietly():
    # `erde models | head`: the reader leaves before erde writes; no "Broken pipe", no traceback.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.Popen(
        [sys.executable, "-m", "erde", "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    done.stdout.close()
    err = done.stderr.read().decode()
    assert done.wait() == 141 and err == ""  # 128 + SIGPIPE, as a shell reports it


def test_macs_table_prints_the_library_numbers(capsys):
    code, out, _ = run_cli(capsys, "macs", "resnet56")
    assert code == 0
    rows = macs_table(create_model("resnet56"))
    for r in rows:
        assert f"{r['cumulative_macs']:,}" in out
    assert "% of full" in out and f"{rows[-1]['percent_of_full']:.1f}" in out


def test_config_shows_overrides(capsys):
    code, out, _ = run_cli(capsys, "config", "digits-teacher", "train.epochs=7")
    assert code == 0 and "epochs: 7" in out and "source: digits" in out


def write_npz(root, dtype=np.uint8, labels=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        x = rng.integers(0, 255, (n, 8, 8, 1)).astype(dtype)
        y = np.arange(n) % 4 if labels is None else np.full(n, labels)
        np.savez(root / f"{split}.npz", x=x, y=y)
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["macs", "resnet21"], "unknown model"),
        (["macs", "resnet20", "--exits", "0,3"], "exit"),
        (["macs", "resnet20", "--exits", "every:0"], "every"),
        (["macs", "vgg11", "--input-size", "8"], "input"),
        (["train", "digits-student", "data.source=imagenet"], "unknown data source"),
        (["train", "digits-student", "data.source=cifar10", "data.root={tmp}/empty"], "missing"),
        (["train", "digits-student", "data.source=npz", "data.root={tmp}/float"], "uint8"),
        (["train", "digits-student", "data.source=npz", "data.root={tmp}/labels"], "label"),
        (["train", "no-such-preset"], "unknown train preset"),
        (["train", "{tmp}/missing.yaml"], "does not exist"),
        (["reproduce", "--preset", "nope"], "unknown reproduce preset"),
        (["reproduce", "--preset", "quickstart", "methods=[ce,magic]"], "magic"),
        (["evaluate", "{tmp}/nothing"], "does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_message(tmp_path, capsys, argv, message):
    write_npz(tmp_path / "float", dtype=np.float32)
    write_npz(tmp_path / "labels", labels=-1)
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert message.lower() in err.lower()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_argparse_mistakes_also_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--preset", "quickstart", "--seeds", "0,x"])
    assert exc.value.code == 2


def test_version_and_help_with_examples_and_defaults(capsys):
    import erde

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"erde {erde.__version__}"
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  erde reproduce --preset" in out
    assert "quickstart" in out and "cifar10-cpu" in out  # preset names listed
    assert "(default: runs/reproduce)" in out and "(default: 1)" in out


def test_import_erde_does_not_load_torch():
    code = "import sys, erde; assert 'torch' not in sys.modules, 'torch loaded'; erde.create_model"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("exits", ["3,6", "[3, 6]", " [3,6] "])
def test_macs_exits_take_the_list_form_the_messages_offer(capsys, exits):
    code, out, err = run_cli(capsys, "macs", "resnet20", "--exits", exits)
    assert code == 0, err
    # ResNet-20 has 9 blocks: exits after blocks 3 and 6 and the final one, 3 rows in all.
    rows = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["3", "6", "9"]


def test_exits_as_a_list_in_a_config_are_the_comma_text(tmp_path):
    from erde.config.schema import load_config, load_reproduce_config

    (tmp_path / "run.yaml").write_text("model:\n  exits: [3, 6]\n")
    assert load_config(str(tmp_path / "run.yaml")).model.exits == "3,6"
    assert load_config("digits-student", ["model.exits=[3, 6]"]).model.exits == "3,6"
    assert load_config("digits-student", ["model.exits=[]"]).model.exits == "[]"
    study = load_reproduce_config("quickstart", ["student.model.exits=[1, 2]"])
    assert study.student.model.exits == "1,2"


def test_no_early_exits_as_an_empty_list(capsys):
    code, out, err = run_cli(capsys, "macs", "resnet20", "--exits", "[]")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].split("|")[2].strip() == "9"  # the final exit only
