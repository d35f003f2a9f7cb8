"""Every ``fortify ...`` command in a fenced block of README.md and docs/ is a valid command.

Each command line is parsed by the real ``fortify`` parser (subcommands, flags, choices), and a
``fortify train`` line's preset and overrides are loaded as the command would load them (files
exist, fields and types are valid). Python blocks must compile. Running every command at the
docs' sizes would take hours on a CPU, so this test checks in seconds what can be checked;
tests/test_docs_run.py runs them (with the tiny sizes the pages name).
"""

from __future__ import annotations

import shlex

import pytest
from docs_blocks import ROOT, blocks

from fortify.cli.main import build_parser


def _commands() -> list[tuple[str, str]]:
    found = []
    for block in blocks():
        if block.lang == "python":
            continue
        for line in block.commands():
            if line.startswith("fortify ") and "..." not in line:
                found.append((block.where, line))
    return found


COMMANDS = _commands()
PYTHON = [(b.where, b.body) for b in blocks() if b.lang == "python"]


def test_the_docs_have_commands_and_snippets() -> None:
    assert len(COMMANDS) >= 30 and len(PYTHON) >= 5


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[c[1][:60] for c in COMMANDS])
def test_documented_command_parses(where: str, line: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    argv = shlex.split(line, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help / --version exit 0
            pytest.fail(f"{where}: `{line}` is not a valid fortify command")
        return
    preset = getattr(args, "config", None)
    placeholder = preset is not None and not preset.startswith("configs/")  # e.g. my.yaml
    if getattr(args, "command", None) == "train" and not args.resume and not placeholder:
        from fortify.config import ExperimentConfig, load_config

        load_config(ExperimentConfig, args.config, list(args.sets) + list(args.overrides))


@pytest.mark.parametrize(
    ("where", "code"), PYTHON, ids=[f"{w}#{i}" for i, (w, _) in enumerate(PYTHON)]
)
def test_documented_python_compiles(where: str, code: str) -> None:
    compile(code, where, "exec")
