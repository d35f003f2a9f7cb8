"""CPU-scale replications; each module is a ``fortify replicate <NAME>`` plugin.

A new plug-in is a module here exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (heavy imports inside ``run``), added to the import and the tuple below.
"""

from fortify.registry import plugin_registry
from fortify.replicate import (
    bf16_parity,
    fpd_table,
    fsr_ablations,
    fsr_table1,
    fsr_table4,
    rift_table1,
)

#: Every ``fortify replicate`` plug-in, by ``NAME``.
PLUGINS = plugin_registry(
    "replication", (bf16_parity, fpd_table, fsr_ablations, fsr_table1, fsr_table4, rift_table1)
)
