"""The registry of evaluation suites: :func:`register_suite`, :func:`get_suite`, options.

A suite is ``fn(ctx: SuiteContext) -> None`` registered under a name with the option names it
accepts (or an options dataclass with ``validate()``). The built-in suites register when
:mod:`fortify.evaluate` is imported (``paper``, ``quick``, ``autoattack``, ``full`` and ``pgd10`` in
:mod:`fortify.evaluate.suites`, ``ood`` in :mod:`fortify.evaluate.ood`, ``adaptive`` in
:mod:`fortify.evaluate.adaptive`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, overload

from torch import nn

from fortify.config.schema import EvalConfig
from fortify.errors import ConfigError
from fortify.evaluate.context import SuiteContext
from fortify.registry import Registry

log = logging.getLogger(__name__)

SuiteFn = Callable[[SuiteContext], None]


@dataclass(frozen=True)
class SuiteSpec:
    """A registered suite.

    Attributes:
        options: the option names the suite accepts (``evaluate(..., suite_options=...)``).
        options_type: a dataclass whose fields are those names; when set, the given options are
            checked by building it and calling its ``validate()`` (if any) before the run.
        shardable: the suite attacks chunk by chunk through ``ctx.batches()`` with randomness
            from (seed, chunk) only, so it may run sharded (``torchrun``, ``--shard i/n``).
    """

    name: str
    fn: SuiteFn
    description: str = ""
    options: tuple[str, ...] = ()
    options_type: type | None = None
    shardable: bool = False

    def check_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """A validated copy of ``given``; an unknown name raises :class:`ConfigError`."""
        if given is None:
            return {}
        if not isinstance(given, Mapping):
            raise ConfigError(
                f"suite_options must be a mapping of option name to value, got "
                f"{type(given).__name__}"
            )
        opts = dict(given)
        bad = sorted(str(k) for k in opts if k not in self.options)
        if bad:
            allowed = ", ".join(self.options) if self.options else "none (it takes no options)"
            raise ConfigError(
                f"evaluation suite {self.name!r} does not accept the option(s) {', '.join(bad)}; "
                f"allowed: {allowed}"
            )
        if self.options_type is not None:
            validate = getattr(self.options_type(**opts), "validate", None)
            if callable(validate):
                validate()
        return opts


#: Every evaluation suite, by name.
SUITES: Registry[SuiteSpec] = Registry("evaluation suite")


@overload
def register_suite(
    name: str,
    fn: SuiteFn,
    *,
    description: str = "",
    options: Sequence[str] | type | None = None,
    shardable: bool = False,
) -> SuiteFn: ...


@overload
def register_suite(
    name: str,
    fn: None = None,
    *,
    description: str = "",
    options: Sequence[str] | type | None = None,
    shardable: bool = False,
) -> Callable[[SuiteFn], SuiteFn]: ...


def register_suite(
    name: str,
    fn: SuiteFn | None = None,
    *,
    description: str = "",
    options: Sequence[str] | type | None = None,
    shardable: bool = False,
) -> SuiteFn | Callable[[SuiteFn], SuiteFn]:
    """Register ``fn(ctx: SuiteContext) -> None`` as suite ``name`` (usable as a decorator).

    A suite adds columns through ``ctx.run_pgd``, ``ctx.run_fgsm``, ``ctx.run_attack`` or
    ``ctx.add(Outcome(...))`` and findings through ``ctx.check(name, status, message)``.

    Args:
        options: the option names the suite accepts in ``ctx.options`` (from
            ``evaluate(..., suite_options=...)``), or a dataclass whose fields are those names
            (its ``validate()``, if any, checks the values before the run). None: no options.
        shardable: True if the suite works only through ``ctx.batches()`` (chunks of points)
            and draws randomness from (seed, chunk) only (see :mod:`fortify.evaluate.shard`).
    """
    if options is None:
        names: tuple[str, ...] = ()
        options_type = None
    elif isinstance(options, type):
        if not is_dataclass(options):
            raise ConfigError(
                f"options of suite {name!r} must be a sequence of names or a dataclass, got "
                f"class {options.__name__}"
            )
        names, options_type = tuple(f.name for f in fields(options)), options
    elif isinstance(options, str):
        raise ConfigError(
            f"options of suite {name!r} must be a sequence of names, got the string {options!r}"
        )
    else:
        names, options_type = tuple(options), None

    def deco(f: SuiteFn) -> SuiteFn:
        desc = description or (f.__doc__ or "").strip().split("\n")[0]
        SUITES.register(name, SuiteSpec(name, f, desc, names, options_type, shardable))
        return f

    return deco(fn) if fn is not None else deco


def available_suites() -> dict[str, str]:
    """``{name: description}`` of every registered suite."""
    return {k: v.description for k, v in SUITES.items()}


def get_suite(name: str) -> SuiteSpec:
    """The registered suite ``name`` (raises listing the known suites)."""
    return SUITES.get(name)


def suites_with(predicate: Callable[[SuiteSpec], bool]) -> list[str]:
    """Sorted names of the suites for which ``predicate(spec)`` holds."""
    return [k for k, v in SUITES.items() if predicate(v)]


def eval_config_options(eval_cfg: EvalConfig) -> dict[str, Any]:
    """The ``suite_options`` an :class:`fortify.config.EvalConfig` implies for its suite.

    ``autoattack_points`` is passed when set and the suite accepts it (``autoattack``, ``full``,
    ``adaptive``); for a suite that runs no AutoAttack it has no effect and a warning says so.
    """
    points = eval_cfg.autoattack_points
    if points is None:
        return {}
    spec = get_suite(eval_cfg.suite)
    if "autoattack_points" in spec.options:
        return {"autoattack_points": points}
    takers = suites_with(lambda s: "autoattack_points" in s.options)
    log.warning(
        "eval.autoattack_points=%s has no effect: suite %r does not take it (suites that do: %s)",
        points,
        eval_cfg.suite,
        ", ".join(takers),
    )
    return {}


def describe_option(value: Any) -> Any:
    """A JSON-safe rendering of an option value (modules by class name, paths as strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): describe_option(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [describe_option(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)
