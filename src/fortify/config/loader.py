"""Generic dataclass <-> dict/YAML conversion with strict validation.

Errors always name the dotted field path, the offending value, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fortify.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Convert a (nested) config dataclass into plain dicts/lists/scalars."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # X | None: the one real type's message is the precise one
            raise ConfigError(errors[0])
        raise ConfigError(f"{path}: {value!r} does not fit type {_type_name(tp)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping for section {tp.__name__}, got {value!r}"
            )
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        (arg, *rest) = get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{path}: option names must be strings, got {bad[0]!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:  # an integer beyond the float range
            out = math.inf
        if not math.isfinite(out):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown fields and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {path!r}" if path else "the top level"
        raise ConfigError(
            f"unknown field(s) {unknown} in {where}; allowed fields: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _parse_scalar(text: str, item: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"override {item!r}: the value {text!r} is not valid YAML ({first}); quote strings "
            "and close brackets, e.g. train.milestones=[1,2]"
        ) from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p.strip() for p in parts):
            raise ConfigError(
                f"override {item!r}: {key.strip()!r} is not a field path; use section.field=value"
            )
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(raw, item)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping.

    Only plain YAML is read (``yaml.safe_load``: no Python objects, no code).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); a config is a "
            "YAML text file"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {str(path)!r} is nested too deeply") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            f"config file {str(path)!r}: top-level keys must be section names, got {bad[0]!r}"
        )
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Load ``cls`` from an optional YAML file plus ``section.field=value`` overrides.

    A file may name a base preset with ``base: other.yaml`` (relative to the file); the file's
    fields are merged over the base's.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _load_with_base(Path(path))
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is None:
            raise
        extra = " plus command-line overrides" if overrides else ""
        raise ConfigError(f"{exc} (in config file {str(path)!r}{extra})") from exc


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf field of config dataclass ``cls`` as ``(dotted.name, type, default)``.

    Nested sections are expanded; used by ``fortify train --help`` to list the defaults.
    """
    out: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.extend(describe_fields(tp, f"{name}."))
        else:
            out.append((name, _type_name(tp), to_dict(default)))
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_base(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``path``'s mapping merged over the one its ``base:`` names (relative to ``path``'s
    folder), recursively; ``chain`` holds the files that named it, to refuse cycles."""
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain, here)[chain.index(here) :])
        raise ConfigError(f"config {str(path)!r}: `base:` files form a cycle: {loop}")
    if len(chain) >= 16:
        raise ConfigError(f"config {str(path)!r}: `base:` chain is deeper than 16 files")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"config {str(path)!r}: base must be the file name of another preset (a string, "
            f"relative to this file), got {base!r}"
        )
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(
            f"config {str(path)!r}: base {base!r} does not exist (looked for {str(base_path)!r})"
        )
    return _merge(_load_with_base(base_path, (*chain, here)), data)
