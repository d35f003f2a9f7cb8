"""Importers for released checkpoints; each module is a ``fortify import <NAME>`` plugin.

A new plug-in is a module here exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (heavy imports inside ``run``), added to the import and the tuple below.
"""

from fortify.importers import fsr_release, model, rift_release, robustbench
from fortify.registry import plugin_registry

#: Every ``fortify import`` plug-in, by ``NAME``.
PLUGINS = plugin_registry("import kind", (fsr_release, model, rift_release, robustbench))
