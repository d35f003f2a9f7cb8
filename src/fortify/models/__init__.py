"""Backbones behind a registry. ``create("resnet18", num_classes=10)``; ``available()`` lists names.

Every backbone maps images in [0, 1] of shape (N, C, H, W) to logits (N, K) and normalises inside
(``model.normalize``). Module names follow the seed releases; see ``docs/models.md``.
"""

from fortify.models.registry import (
    ModelSpec,
    Normalize,
    available,
    create,
    describe_kwargs,
    register,
    spec,
)

# Importing the backbone modules registers them.
from fortify.models import small_cnn  # noqa: E402,F401  isort: skip
from fortify.models import resnet  # noqa: E402,F401  isort: skip
from fortify.models import preact_resnet  # noqa: E402,F401  isort: skip
from fortify.models import vgg  # noqa: E402,F401  isort: skip
from fortify.models import wide_resnet  # noqa: E402,F401  isort: skip
from fortify.models._common import count_parameters  # noqa: E402  isort: skip

__all__ = [
    "ModelSpec",
    "Normalize",
    "available",
    "count_parameters",
    "create",
    "describe_kwargs",
    "register",
    "spec",
]
