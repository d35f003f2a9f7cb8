"""Sub-subcommands found in a package (``fortify import <kind>``, ``fortify replicate <name>``).

Each plugin module in the package exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; it keeps heavy imports inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

from fortify.cli._help import HelpFormatter


def discover(package: str) -> dict[str, ModuleType]:
    """Import every plugin module of ``package`` and map ``NAME`` to the module."""
    pkg = importlib.import_module(package)
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            found[mod.NAME] = mod
    return found


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
