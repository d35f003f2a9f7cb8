"""Every ``--help`` shows real defaults in plain text (no ``default: None``, no markup)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from fortify.cli._help import show_default
from fortify.cli.main import build_parser


def _walk(p: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _walk(sp, f"{path} {name}")


PARSERS = dict(_walk(build_parser(), "fortify"))


def test_every_subcommand_is_walked() -> None:
    for name in (
        "fortify train",
        "fortify eval",
        "fortify demo",
        "fortify rift run",
        "fortify rift mrc",
        "fortify import fsr-release",
        "fortify replicate fsr-table1",
        "fortify export robustbench",
    ):
        assert name in PARSERS


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_help_is_plain_text_with_real_defaults(path: str) -> None:
    p = PARSERS[path]
    text = p.format_help()
    assert "default: None" not in text
    assert "``" not in text and not re.search(r":(func|class|meth|mod|attr):`", text), text
    for n, d in re.findall(r"\(=(\d+)/(\d+)\)", text):  # pixel budgets only, never 6 = 1530/255
        assert int(n) < int(d), text
    for action in p._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        shown = show_default(action.default)
        line = p._get_formatter()._format_action(action)
        if shown is not None:
            assert "default" in line, f"{path} {action.option_strings}: {line}"


@pytest.mark.parametrize("step", ["mrc", "finetune", "interpolate", "run"])
def test_rift_help_states_the_config_defaults(step: str) -> None:
    from fortify.cli.cmd_rift import _MAP
    from fortify.rift.config import RiftConfig

    p = PARSERS[f"fortify rift {step}"]
    cfg = RiftConfig()
    by_dest = {a.dest: a for a in p._actions}
    checked = 0
    for dest, key in _MAP.items():
        if dest not in by_dest:
            continue
        value: object = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            assert "default:" in by_dest[dest].help
            continue
        line = " ".join(p._get_formatter()._format_action(by_dest[dest]).split())
        assert f"default: {show_default(value)}" in line, (dest, value, line)
        checked += 1
    assert checked >= 6
    suites = (
        " ".join(p._get_formatter()._format_action(by_dest["suites"]).split())
        if ("suites" in by_dest)
        else None
    )
    if suites is not None:
        assert f"default: {show_default(cfg.evaluate.suites)}" in suites


def test_train_with_a_config_file_as_override_hints_at_config(tmp_path, capsys) -> None:
    from fortify.cli.main import main

    assert main(["train", "configs/x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "must look like section.field=value" in err and "use --config configs/x.yaml" in err


def test_rift_on_a_missing_run_says_the_run_is_missing(tmp_path, capsys) -> None:
    from fortify.cli.main import main

    assert main(["rift", "run", str(tmp_path / "does-not-exist")]) == 2
    err = capsys.readouterr().err
    assert "no run directory at" in err and "does-not-exist" in err and "safetensors" not in err
    assert not (tmp_path / "does-not-exist").exists()
