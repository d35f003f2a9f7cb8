"""Sub-subcommands a package registers (``fortify import <kind>``, ``fortify replicate <name>``).

Each plug-in module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(heavy imports inside ``run``); its package's ``PLUGINS`` registry lists it
(:func:`fortify.registry.plugin_registry`).
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from fortify.cli._help import HelpFormatter


def discover(package: str) -> dict[str, ModuleType]:
    """``{NAME: module}`` of the plug-ins registered by ``package`` (its ``PLUGINS`` registry)."""
    return dict(importlib.import_module(package).PLUGINS.items())


def add_plugin_parsers(
    parser: argparse.ArgumentParser, package: str, dest: str
) -> dict[str, tuple[ModuleType, argparse.ArgumentParser]]:
    """Add one sub-parser per plugin of ``package``; the chosen module lands in ``args._plugin``.

    Returns ``{name: (module, sub-parser)}`` (to add options common to several plugins).
    """
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
    added = {}
    for name, mod in sorted(discover(package).items()):
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_plugin=mod)
        added[name] = (mod, p)
    return added


def run_plugin(args: argparse.Namespace) -> int:
    return int(args._plugin.run(args) or 0)
