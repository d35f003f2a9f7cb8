"""``fortify import KIND SRC ...``: convert released checkpoints into fortify checkpoints."""

from __future__ import annotations

import argparse

from fortify.cli._plugins import add_plugin_parsers, run_plugin

DESCRIPTION = (
    "Convert a checkpoint released with a paper into a fortify checkpoint (safetensors + JSON "
    "sidecar) whose model returns plain logits. Kinds are listed below."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plugin_parsers(parser, "fortify.importers", "kind")


def run(args: argparse.Namespace) -> int:
    return run_plugin(args)
