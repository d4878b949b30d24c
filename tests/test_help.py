"""`erde --help` and every `erde COMMAND --help`: light to load, and each option explained.

Help needs no PyTorch, ONNX or plotting: a real `python -m erde --help` process is checked for
what it imported. Every sub-command shows examples that parse, every option a help line with its
default, and every command that takes a preset lists the preset names.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from erde.cli import deploy as commands
from erde.cli.main import build_parser
from erde.config.schema import preset_names

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "optuna", "timm",
         "matplotlib", "sklearn", "scipy")  # fmt: skip
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_imports_no_heavy_library():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "erde", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "COMMAND" in done.stdout
    # -X importtime writes one "import time: self | cumulative | name" line per module imported.
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "erde" in imported and "argparse" in imported  # the lines were read right
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_command_help_imports_no_heavy_library():
    """Every `erde COMMAND --help`, in a fresh process, leaves the heavy libraries unloaded."""
    code = (
        "import sys\n"
        "from erde.cli.main import main\n"
        f"for name in {sorted(subcommands())!r}:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_version_is_the_installed_distributions():
    version = re.search(r'^version = "(.+)"$', PYPROJECT.read_text(), re.M)[1]
    done = subprocess.run(
        [sys.executable, "-m", "erde", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"erde {version}"


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_showing_its_default(name):
    p = subcommands()[name]
    formatter = p._get_formatter()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"erde {name}: {action.dest} has no help"
        text = formatter._get_help_string(action)
        flag = action.nargs == 0  # store_true: off unless given
        optional = action.option_strings and not action.required and not flag
        if optional or action.nargs == "?":
            assert "default" in text, f"erde {name} {action.dest}: {text!r} shows no default"
        shown = action.default
        if isinstance(shown, list):
            shown = ",".join(map(str, shown))
        if not flag and shown not in (None, ""):  # a value, 0 included: shown as it is
            assert f"default: {shown}" in text, f"erde {name} {action.dest}: {text!r}"


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_has_examples_that_parse(name):
    p = subcommands()[name]
    help_text = p.format_help()
    assert "\nexamples:\n" in help_text
    examples = [line.strip() for line in help_text.split("\nexamples:\n")[1].splitlines()]
    assert examples and all(e.startswith(f"erde {name}") for e in examples)
    parser = build_parser()
    for example in examples:
        argv = shlex.split(example.split(" > ")[0], comments=True)[1:]
        args, extra = parser.parse_known_args(argv)
        assert args.command == name
        assert all("=" in e and not e.startswith("-") for e in extra), (example, extra)


@pytest.mark.parametrize(
    "name, kinds",
    [("train", ["train"]), ("config", ["train", "reproduce"]), ("reproduce", ["reproduce"]),
     ("tune", ["reproduce"])],
)  # fmt: skip
def test_commands_that_take_a_preset_list_them(name, kinds):
    text = " ".join(subcommands()[name].format_help().split())  # unwrapped
    for kind in kinds:
        names = preset_names(kind)
        assert names and ", ".join(names) in text


def test_parser_choices_match_the_modules_they_stand_for():
    """The parser spells out two values so that help needs no PyTorch; they must stay true."""
    from erde.deploy.onnx_export import OPSET, OPSETS
    from erde.deploy.runtime import FORMS

    assert f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default: {OPSET})" == commands.OPSET_HELP
    assert commands.FORMS == FORMS


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_the_score_normalisation_flag_says_score_and_keeps_its_old_spelling(command):
    from erde.cli.main import build_parser

    parser = build_parser()
    extra = ["--out", "x"] if command == "export" else []
    for flag in ("--normalize-score", "--normalize"):
        assert parser.parse_args([command, "run", flag, *extra]).normalize is True
    assert parser.parse_args([command, "run", *extra]).normalize in (False, None)
