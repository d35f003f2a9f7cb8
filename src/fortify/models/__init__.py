"""Backbones behind a registry. ``create("resnet18", num_classes=10)``; ``available()`` lists names."""

from fortify.models.registry import Normalize, available, create, register, spec

# Importing the backbone modules registers them.
from fortify.models import small_cnn  # noqa: E402,F401  isort: skip

__all__ = ["Normalize", "available", "create", "register", "spec"]
