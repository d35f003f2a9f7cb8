"""The one registry every plug-in kind of fortify uses (models, datasets, defences, objectives,
evaluation suites, model sources, ``import`` / ``export`` / ``replicate`` plugins).

A :class:`Registry` maps names to objects. Plug-in modules register at import time, and each
package's ``__init__`` imports its plug-in modules eagerly, so a registry is complete as soon as
its package is imported and a broken plug-in fails loudly with its own ``ImportError`` (never as
"unknown name")::

    SUITES: Registry[SuiteSpec] = Registry("evaluation suite")
    SUITES.register("paper", spec)        # ConfigError if "paper" is taken
    SUITES.get("papr")                    # FortifyError: unknown ... Did you mean: paper?
    SUITES.available()                    # sorted names

Command plug-ins (``fortify import <kind>``, ``fortify export <kind>``, ``fortify replicate
<name>``) are modules exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
their package's ``__init__`` imports them and builds its registry with :func:`plugin_registry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Generic, TypeVar

from fortify.errors import ConfigError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → objects of one plug-in kind.

    Args:
        kind: what the names name, used in messages (``"model"``, ``"evaluation suite"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Add ``obj`` under ``name`` and return it.

        Raises:
            ConfigError: ``name`` is not a non-empty string, or already names another object
                (unless ``replace``). Registering an equal object again (a module reloaded) is
                allowed.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and not replace and not (old is obj or old == obj):
            raise ConfigError(
                f"{self.kind} {name!r} is registered twice (already: {self._items[name]!r})"
            )
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            FortifyError: unknown name; the message lists the known names and close matches.
        """
        if name not in self._items:
            raise unknown_name(self.kind, str(name), self._items)
        return self._items[name]

    def available(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """Every registered name in registration order (e.g. a catalogue's family order)."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.available())})"


#: What a command plug-in module exposes.
PLUGIN_ATTRIBUTES = ("NAME", "HELP", "add_arguments", "run")


def plugin_registry(kind: str, modules: Iterable[ModuleType]) -> Registry[ModuleType]:
    """A registry of command plug-in ``modules`` under their ``NAME``.

    Raises:
        ConfigError: a module lacks one of :data:`PLUGIN_ATTRIBUTES`, or two share a NAME.
    """
    registry: Registry[ModuleType] = Registry(kind)
    for mod in modules:
        missing = [a for a in PLUGIN_ATTRIBUTES if not hasattr(mod, a)]
        if missing:
            raise ConfigError(
                f"{kind} plug-in {mod.__name__} lacks {', '.join(missing)} (a plug-in module "
                f"exposes {', '.join(PLUGIN_ATTRIBUTES)})"
            )
        registry.register(mod.NAME, mod)
    return registry
