"""``fortify export <kind>`` plugins: fortify checkpoints → other tools' layouts.

A new plug-in is a module here exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (heavy imports inside ``run``), added to the import and the tuple below.
"""

from fortify.exporters import robustbench
from fortify.registry import plugin_registry

#: Every ``fortify export`` plug-in, by ``NAME``.
PLUGINS = plugin_registry("export kind", (robustbench,))
