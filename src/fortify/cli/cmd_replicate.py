"""``fortify replicate NAME``: CPU-scale replications of the papers' tables."""

from __future__ import annotations

import argparse

from fortify.cli._plugins import add_plugin_parsers, run_plugin

DESCRIPTION = "Run a CPU-scale replication of a paper's table and write it to a run directory."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plugin_parsers(parser, "fortify.replicate", "name")


def run(args: argparse.Namespace) -> int:
    return run_plugin(args)
