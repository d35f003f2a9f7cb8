"""``fortify export KIND ...``: write fortify checkpoints in other tools' layouts."""

from __future__ import annotations

import argparse

from fortify.cli._plugins import add_plugin_parsers, run_plugin

DESCRIPTION = (
    "Write a fortify run or checkpoint in another tool's layout (read back with `fortify "
    "import`). Kinds are listed below."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plugin_parsers(parser, "fortify.exporters", "kind")


def run(args: argparse.Namespace) -> int:
    return run_plugin(args)
