"""RiFT (robust critical fine-tuning): MRC, fine-tuning one module, weight interpolation.

``fortify rift run RUN`` runs the whole workflow; the pieces are importable:
:func:`compute_mrc`, :func:`choose_module`, :func:`finetune`, :func:`interpolate_state`,
:func:`select_alpha`, :class:`RiftRun`.
"""

from fortify.rift.config import RiftConfig, load_rift_config
from fortify.rift.finetune import FinetuneOptions, finetune
from fortify.rift.interpolate import (
    GridPoint,
    alpha_grid,
    evaluate_grid,
    interpolate_state,
    select_alpha,
)
from fortify.rift.mrc import (
    MRCOptions,
    build_adversarial_set,
    compute_mrc,
    get_weight,
    module_mrc,
    weight_modules,
)
from fortify.rift.mrc_report import ModuleMRC, MRCReport
from fortify.rift.pipeline import RiftRun
from fortify.rift.select import choose_module, middle_modules

__all__ = [
    "FinetuneOptions",
    "GridPoint",
    "MRCReport",
    "ModuleMRC",
    "RiftConfig",
    "RiftRun",
    "alpha_grid",
    "build_adversarial_set",
    "choose_module",
    "MRCOptions",
    "compute_mrc",
    "evaluate_grid",
    "finetune",
    "get_weight",
    "interpolate_state",
    "load_rift_config",
    "middle_modules",
    "module_mrc",
    "select_alpha",
    "weight_modules",
]
