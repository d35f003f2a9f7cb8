"""Generic dataclass <-> dict/YAML conversion with strict validation.

Errors always name the dotted field path, the offending value, and what is allowed.

Config files and ``section.field=value`` overrides are read by one YAML loader,
:class:`ConfigLoader`: PyYAML's safe loader (plain data only) whose numbers follow YAML 1.2 and
Python rather than YAML 1.1, so ``5e-4``, ``1E6``, ``+1e3``, ``+.5`` are numbers (YAML 1.1 reads
exponents only with a dot and a signed exponent, ``5.0e-4``, and everything else as a string).
A number of that kind keeps the text it was written as: a ``str`` field given ``1e3`` gets the
string ``"1e3"``, as it always did, so nothing that was a string becomes a number where the
schema asks for text. ``nan``, ``inf`` stay strings, and ``.nan`` / ``.inf`` are refused by
every number field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fortify.errors import ConfigError

T = TypeVar("T")

_FLOAT_TAG = "tag:yaml.org,2002:float"
_DIGITS = r"[0-9](?:_?[0-9])*"  # underscores only between digits, as in Python
#: A decimal number with a point or an exponent (YAML 1.2 core schema, plus Python's digit
#: underscores): ``5e-4``, ``1E6``, ``+1e3``, ``.5``, ``+.5``, ``5.``, ``1_000.5``, ``2.5e3``.
#: Not ``nan``, ``inf`` (strings) or ``.nan``, ``.inf`` (YAML's own spellings, read as before).
_EXPONENT = rf"[eE][-+]?{_DIGITS}"
_DECIMAL = re.compile(  # a point or an exponent: 10, 010, 0x1F stay integers as before
    rf"^[-+]?(?:{_DIGITS}\.(?:{_DIGITS})?(?:{_EXPONENT})?|\.{_DIGITS}(?:{_EXPONENT})?"
    rf"|{_DIGITS}{_EXPONENT})$"
)
#: PyYAML's YAML 1.1 float pattern: what it already read as a number.
_YAML11_FLOAT = next(
    rx for tag, rx in yaml.SafeLoader.yaml_implicit_resolvers["1"] if tag == _FLOAT_TAG
)


class _Number(float):
    """A float read from a decimal spelling in YAML, with the ``text`` it was written as.

    Only :func:`_coerce` sees it: a ``str`` field gets the text back where YAML 1.1 read it as a
    string, an ``int`` field takes a whole number written with an exponent (``5e4``); every
    value leaving :func:`from_dict` (or :func:`plain`) is a plain ``float``.
    """

    text: str

    def __new__(cls, text: str) -> _Number:
        obj = super().__new__(cls, text.replace("_", ""))
        obj.text = text
        return obj

    def __repr__(self) -> str:  # error messages quote the value as written
        return self.text

    @property
    def was_string(self) -> bool:
        """True where YAML 1.1 (plain ``yaml.safe_load``) reads the text as a string."""
        return _YAML11_FLOAT.match(self.text) is None

    @property
    def exponent(self) -> bool:
        return "e" in self.text.lower()


def _use_decimal_floats(cls: Any) -> None:
    """Make ``cls`` (a loader or dumper) read :data:`_DECIMAL` spellings as floats, before any
    other implicit tag (the YAML 1.1 float pattern stays for ``.inf``, ``.nan``, ``1:30.5``)."""
    table = {k: list(v) for k, v in cls.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        table.setdefault(first, []).insert(0, (_FLOAT_TAG, _DECIMAL))
    cls.yaml_implicit_resolvers = table


#: The most values (scalars, lists, mappings) a config may hold once aliases are expanded: far
#: above any real config, far below what ``a: &a [..]`` nested ten times (10⁹ values) makes.
MAX_VALUES = 100_000


class ConfigLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML is untyped
    """PyYAML's safe loader (plain data, no Python objects) reading numbers as YAML 1.2 does:
    the loader of config files, ``section.field=value`` overrides and ``--model-arg`` values.

    A document whose aliases (``*a``) make it refer to itself or expand to more than
    :data:`MAX_VALUES` values is refused (``yaml.YAMLError``): copying it would never end.
    """

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Raise ``yaml.YAMLError`` when ``root`` contains itself or expands past MAX_VALUES."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.YAMLError(
                f"an alias refers to a collection that contains it ({node.start_mark}); a "
                "config must be a finite tree of values"
            )
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise yaml.YAMLError(
                f"the document expands to more than {MAX_VALUES} values (aliases * repeating "
                "anchored collections &); a config is small: write the values out"
            )
        sizes[key] = total
        return total

    size(root)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = loader.construct_scalar(node)
    if isinstance(text, str) and _DECIMAL.match(text):
        return _Number(text)
    return loader.construct_yaml_float(node)  # .inf, .nan, 1:30.5, 1__0.0


_use_decimal_floats(ConfigLoader)
ConfigLoader.add_constructor(_FLOAT_TAG, _construct_float)


class ConfigDumper(yaml.SafeDumper):  # type: ignore[misc]
    """PyYAML's safe dumper quoting what :class:`ConfigLoader` would read back as another type
    (the string ``"1e3"`` is written ``'1e3'``), so a dumped config reads back equal."""


_use_decimal_floats(ConfigDumper)


def parse_yaml(text: str) -> Any:
    """``text`` read by :class:`ConfigLoader`; raises ``yaml.YAMLError`` as ``yaml.safe_load``.

    Numbers written in decimal spellings are ``float`` subclasses that remember their text
    until :func:`from_dict` types them; :func:`plain` turns them into ``float`` where no schema
    applies.
    """
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: plain data only


def plain(value: Any) -> Any:
    """``value`` with every number read by :func:`parse_yaml` as a plain ``float`` (in nested
    dicts and lists too): for values that no schema field types, e.g. ``--model-arg``."""
    if isinstance(value, _Number):
        return float(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


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
        return plain(value)
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
        return plain(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, _Number) and value.exponent:
            return _whole_number(value, path)
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
            beyond = f" (beyond the float range: {out})" if isinstance(value, _Number) else ""
            raise ConfigError(f"{path}: expected a finite number, got {value!r}{beyond}")
        return out
    if tp is str:
        if isinstance(value, _Number) and value.was_string:
            return value.text  # a string to YAML 1.1, and so to every earlier version of fortify
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return plain(value)


def _whole_number(value: _Number, path: str) -> int:
    """An integer field given ``5e4``: the exact integer, or a ConfigError when it has a
    fraction (``1e-3``, ``2.55e1``) or overflows a float (``1e400``)."""
    if not math.isfinite(value):
        raise ConfigError(f"{path}: expected an integer, got {value!r} (beyond the float range)")
    exact = Decimal(value.text.replace("_", ""))
    if exact != exact.to_integral_value():
        raise ConfigError(f"{path}: expected an integer, got {value!r} (not a whole number)")
    return int(exact)


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown fields and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = f"section {path!r}" if path else "the top level"
        close = {
            u: difflib.get_close_matches(u, list(fields), n=1, cutoff=0.6)
            for u in unknown
            if isinstance(u, str)
        }
        guesses = [f"{m[0]!r} for {u!r}" for u, m in close.items() if m]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ConfigError(
            f"unknown field(s) {unknown} in {where}{hint}; allowed fields: {sorted(fields)}"
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
        return parse_yaml(text)
    except RecursionError:
        raise ConfigError(
            f"override {item!r}: the value is nested too deeply to be a config value"
        ) from None
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
    """Read a non-empty YAML mapping (an empty file is a :class:`ConfigError`).

    Only plain YAML is read (:class:`ConfigLoader`, a ``yaml.SafeLoader``: no Python objects,
    no code); numbers as YAML 1.2 reads them (``5e-4`` is a number).
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
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {str(path)!r} is nested too deeply") from exc
    if data is None:
        raise ConfigError(
            f"config file {str(path)!r} is empty (or holds only comments): a config sets at "
            "least one field (without --config the built-in defaults apply)"
        )
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
    if isinstance(base, _Number) and base.was_string:  # a file named like a number
        base = base.text
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
