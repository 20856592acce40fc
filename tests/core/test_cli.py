"""The command line: commands registered by their modules, and the competition chosen at run time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rsna22_utils
from rsna22_utils import cli
from rsna22_utils.core import registry

TOY_STAGES = '''
from dataclasses import dataclass

from rsna22_utils.core.config import StageConfig
from rsna22_utils.core.registry import Stage, register


@dataclass
class HelloConfig(StageConfig):
    """01_hello: says hello."""

    greeting: str = "hello"


COMMAND_MODULES = ("rsna22_utils.toycomp.commands",)
STAGES = (register(Stage("01_hello", HelloConfig, "rsna22_utils.toycomp.stages:hello"), "rsna22_utils.toycomp"),)


def hello(cfg: HelloConfig) -> dict:
    return {"greeting": cfg.greeting}
'''
TOY_COMMANDS = """
def _cmd_hello(args) -> int:
    print(f"hello {args.name}")
    return 7


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("hello", help="say hello")
    p.add_argument("name")
    p.set_defaults(func=_cmd_hello)
"""


@pytest.fixture
def toy_competition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A second competition package, rsna22_utils.toycomp, with one stage, one command and no profiles."""
    package = tmp_path / "toycomp"
    (package / "profiles").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stages.py").write_text(TOY_STAGES)
    (package / "commands.py").write_text(TOY_COMMANDS)
    monkeypatch.setattr(rsna22_utils, "__path__", [*rsna22_utils.__path__, str(tmp_path)])
    monkeypatch.setenv(registry.COMPETITION_ENV, "rsna22_utils.cervical")
    yield "toycomp"
    registry.select_competition("cervical")


def test_a_second_competition_brings_its_own_stages_and_commands(toy_competition: str, capsys: pytest.CaptureFixture) -> None:
    assert "01_train_box" in registry.stages()  # cervical is the default
    assert toy_competition in registry.available_competitions() and "cervical" in registry.available_competitions()
    assert cli.main(["--competition", toy_competition, "hello", "kit"]) == 7
    assert capsys.readouterr().out == "hello kit\n"
    assert list(registry.stages()) == ["01_hello"]
    assert registry.execute("01_hello", registry.get_stage("01_hello").config(greeting="hi")) == {"greeting": "hi"}
    assert os.environ[registry.COMPETITION_ENV] == "rsna22_utils.toycomp"  # what notebook kernels and subprocesses inherit
    with pytest.raises(SystemExit):  # cervical's commands are not offered for this competition
        cli.main(["--competition", toy_competition, "synth", "--out", "x"])

    assert registry.select_competition("rsna22_utils.cervical") == registry.select_competition("cervical") == "rsna22_utils.cervical"
    assert "01_hello" not in registry.stages() and "07_inference" in registry.stages()


def test_the_environment_chooses_the_competition_when_the_command_line_does_not(toy_competition: str, monkeypatch) -> None:
    monkeypatch.setenv(registry.COMPETITION_ENV, toy_competition)
    assert cli.main(["hello", "env"]) == 7
    assert registry.competition() == "rsna22_utils.toycomp"


def test_an_abbreviated_competition_after_the_command_is_refused(toy_competition: str) -> None:
    with pytest.raises(SystemExit) as stop:  # the early read takes only the full option, so the commands would be cervical's
        cli.main(["notebooks", "--comp", toy_competition, "check"])
    assert stop.value.code == 2
    assert registry.competition() == "rsna22_utils.cervical"


def test_an_unknown_competition_is_refused_naming_the_choices(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--competition", "nope", "notebooks", "check"]) == 2
    error = capsys.readouterr().err
    assert "nope" in error and "cervical" in error
    assert registry.competition() == "rsna22_utils.cervical"


def test_every_cervical_command_is_registered_by_a_module() -> None:
    registry.select_competition("cervical")
    commands = cli._parser()._subparsers._group_actions[0].choices
    expected = {"scan", "train", "run", "config", "notebooks", "kaggle", "weights", "synth", "demo", "predict"}
    assert expected <= set(commands)
    assert all(parser.get_default("func") is not None or parser._subparsers for parser in commands.values())
