"""Attach defence modules after any named submodule of any CNN, keeping ``forward(x) → logits``.

A defence module maps a feature map (N, C, H, W) to a feature map of the same shape. ``attach``
registers it on the model and installs a forward hook on the target module that replaces the
target's output with ``defence(output)``. The backbone's own parameter names are unchanged
(``layer2.1.conv2`` still means the same weight); the defence's parameters live under
``fortify_defenses.<target with dots replaced by '__'>``.

Plain containers (``nn.Sequential``/``nn.ModuleList`` as the *root* model) run every child in
order, so a defence cannot be registered on them; for such roots ``attach`` returns a
:class:`Defended` wrapper whose ``net`` is the original model (names gain a ``net.`` prefix).

Defences that need the feature shape are built by a factory ``f(shape) -> nn.Module`` where
``shape = (C, H, W)`` is inferred with one forward pass of a dummy input.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from fortify.errors import ConfigError, FortifyError
from fortify.utils.probe import dry_forward_observed
from fortify.utils.shapes import as_chw, check_chw

DEFENSES_ATTR = "fortify_defenses"

DefenceFactory = Callable[[tuple[int, int, int]], nn.Module]


class _Validated(Protocol):
    def validate(self) -> None: ...


_O = TypeVar("_O", bound=_Validated)


class Defended(nn.Module):
    """Wrapper used when the root model is a plain container; ``forward`` is ``net(x)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ReplaceOutput:
    """Forward hook object (picklable and deep-copyable, unlike a closure)."""

    def __init__(self, defence: nn.Module):
        self.defence = defence

    def __call__(
        self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise FortifyError(
                f"a defence is attached after a {type(module).__name__} whose output is "
                f"{_describe(output)}; defences need a 4-D feature map (N, C, H, W)"
            )
        return self.defence(output)


def _has_defence_hook(module: nn.Module) -> bool:
    return any(isinstance(h, _ReplaceOutput) for h in module._forward_hooks.values())


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _key(name: str) -> str:
    return name.replace(".", "__")


def defence_key(name: str) -> str:
    """The key under ``model.fortify_defenses`` for a defence attached after ``name``."""
    return _key(name)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` or raise listing close matches."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else f"top-level: {', '.join(n for n in names if '.' not in n)}"
    )
    raise FortifyError(f"model has no module named {name!r}; {hint}")


def infer_feature_shapes(
    model: nn.Module, names: Sequence[str], input_shape: tuple[int, int, int]
) -> dict[str, tuple[int, int, int]]:
    """Run one dummy forward pass (eval mode, no grad) and record each named module's output shape.

    Args:
        input_shape: (C, H, W) of one input image.
    Returns: name -> (C, H, W) of that module's output.
    """
    shapes: dict[str, tuple[int, int, int]] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)

    def observe(name: str, out: object) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise FortifyError(
                f"cannot attach a defence after {name!r}: its output is {_describe(out)}, "
                "not a 4-D feature map (N, C, H, W)"
            )
        calls[name] += 1
        shapes[name] = as_chw(out.shape[1:])

    dry_forward_observed(model, input_shape, [(n, find_module(model, n)) for n in names], observe)
    unused = [n for n in names if calls[n] == 0]
    if unused:
        raise FortifyError(
            f"cannot attach a defence after {unused}: the model's forward never runs "
            f"{'this module' if len(unused) == 1 else 'these modules'}; choose a module that "
            "is used in forward"
        )
    reused = {n: c for n, c in calls.items() if c > 1}
    if reused:
        raise FortifyError(
            f"cannot attach a defence after {sorted(reused)}: "
            + ", ".join(f"{n!r} runs {c} times" for n, c in reused.items())
            + " per forward (a shared module, e.g. a ReLU reused inside a torchvision block), "
            "so the defence would be applied more than once; attach after a module that runs "
            "once, such as the enclosing block"
        )
    return shapes


def _check_block(name: str, block: object, shape: tuple[int, int, int], model: nn.Module) -> None:
    """Refuse a factory's result that is not an ``nn.Module``, or whose dry pass (eval mode,
    no gradients, two blank feature maps) does not map a (N, C, H, W) feature map of ``shape``
    to a tensor of the same shape; the global RNG state is left unchanged."""
    if not isinstance(block, nn.Module):
        raise FortifyError(
            f"the defence factory returned {_describe(block)} for {name!r}; it must return an "
            f"nn.Module mapping (N, C, H, W) feature maps to the same shape (here C, H, W = "
            f"{shape})"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    block.to(device)
    was_training = block.training
    try:
        block.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = block(torch.zeros(2, *shape, device=device))
    except FortifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the block's own code
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise FortifyError(
            f"the defence built for {name!r} fails on its feature map (N, C, H, W) = "
            f"(2, {', '.join(map(str, shape))}): {type(exc).__name__}: {msg}"
        ) from exc
    finally:
        block.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, *shape):
        raise FortifyError(
            f"the defence built for {name!r} returns {_describe(out)} for a feature map of shape "
            f"(2, {', '.join(map(str, shape))}); a defence must return a tensor of the same "
            "shape as its input"
        )


def position_names(at: object) -> list[str]:
    """``at`` (one module name or a non-empty sequence of names) as a list; :class:`FortifyError`
    else."""
    if isinstance(at, str):
        return [at]
    if isinstance(at, Sequence) and all(isinstance(n, str) for n in at):
        if not at:
            raise FortifyError("attach needs at least one module name in `at`")
        return list(at)
    raise FortifyError(f"at must be a module name or a list of names, got {at!r}")


def attach(
    model: nn.Module,
    defence: nn.Module | DefenceFactory,
    at: str | Sequence[str],
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """Attach a defence after each module named in ``at``; return the defended model.

    Args:
        model: any ``nn.Module`` mapping (N, C, H, W) images in [0, 1] to logits.
        defence: a module (only valid for a single position) or a factory
            ``f((C, H, W)) -> nn.Module`` called once per position with the inferred shape.
        at: module name(s) as in ``model.named_modules()``, e.g. ``"layer4"``.
        input_shape: (C, H, W) of the model's input; needed when ``defence`` is a factory.
    Returns:
        ``model`` itself (modified in place) or, for a plain-container root, a :class:`Defended`
        wrapper. Either way ``forward(x)`` returns logits.
    """
    if not isinstance(model, nn.Module):
        raise FortifyError(f"attach needs an nn.Module to defend, got {type(model).__name__}")
    if not isinstance(defence, nn.Module) and not callable(defence):
        raise FortifyError(
            f"defence must be an nn.Module or a factory (C, H, W) -> nn.Module, got "
            f"{type(defence).__name__}"
        )
    names = position_names(at)
    if input_shape is not None:
        input_shape = check_chw(input_shape)
    if len(set(names)) != len(names):
        raise FortifyError(f"the same position is listed twice in at={names}")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        model = Defended(model)
        names = [f"net.{n}" for n in names]
    existing = getattr(model, DEFENSES_ATTR, None)
    for name in names:
        target = find_module(model, name)
        # the hook check also catches a second attach to the same plain-container root, whose
        # new Defended wrapper has an empty registry but shares the hooked child modules
        if (existing is not None and _key(name) in existing) or _has_defence_hook(target):
            raise FortifyError(
                f"a defence is already attached after {name!r}; attach once per position"
            )
    if isinstance(defence, nn.Module):
        if len(names) != 1:
            raise FortifyError("pass a factory (shape -> module) to attach at several positions")
        modules = {names[0]: defence}
    else:
        if input_shape is None:
            raise FortifyError("attach(..., input_shape=(C, H, W)) is required with a factory")
        shapes = infer_feature_shapes(model, names, input_shape)
        modules = {n: defence(shapes[n]) for n in names}
        for name, module in modules.items():
            _check_block(name, module, shapes[name], model)
    if existing is None:  # created only once every position is valid
        existing = nn.ModuleDict()
        setattr(model, DEFENSES_ATTR, existing)
    param = next(model.parameters(), None)
    for name, module in modules.items():
        if param is not None:
            module.to(param.device)
        existing[_key(name)] = module
        find_module(model, name).register_forward_hook(_ReplaceOutput(module))
    return model


def attached(model: nn.Module, kind: type[nn.Module] = nn.Module) -> dict[str, Any]:
    """Return {target module name: defence} for every defence attached to ``model``; with
    ``kind``, only the defences that are instances of that class (e.g. ``FSRBlock``)."""
    found = getattr(model, DEFENSES_ATTR, None)
    if found is None:
        return {}
    return {k.replace("__", "."): m for k, m in found.items() if isinstance(m, kind)}


def check_block_sizes(kind: str, channels: object, num_classes: object | None = None) -> None:
    """Raise :class:`ConfigError` unless ``channels`` is an integer >= 1 and ``num_classes``
    (when given) an integer >= 2 — the sizes every block's constructor takes."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ConfigError(f"{kind} channels must be a positive integer, got {channels!r}")
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2
    ):
        raise ConfigError(f"{kind} num_classes must be an integer >= 2, got {num_classes!r}")


class ClassBlockAttacher(Generic[_O]):
    """The public ``attach_<kind>(model, at, num_classes, input_shape, options=None)`` of a
    defence whose blocks know the number of classes (CAS, CIFS): one calling convention.

    A call validates ``options`` (default: ``options_cls()``), builds the blocks with
    ``blocks(names, num_classes, opts)`` — a factory ``f((C, H, W)) -> block`` called once per
    name, in order — attaches them after the modules named in ``at`` and runs ``finish(model,
    opts)`` when given. It returns the defended model (``model`` itself, or a
    :class:`Defended` wrapper for a plain container root).
    """

    def __init__(
        self,
        name: str,
        options_cls: type[_O],
        blocks: Callable[[list[str], int, _O], DefenceFactory],
        doc: str,
        finish: Callable[[nn.Module, _O], None] | None = None,
    ) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = getattr(options_cls, "__module__", __name__)
        self.__doc__ = doc
        self.options_cls = options_cls
        self._blocks = blocks
        self._finish = finish

    def __call__(
        self,
        model: nn.Module,
        at: str | Sequence[str],
        num_classes: int,
        input_shape: tuple[int, int, int],
        options: _O | None = None,
    ) -> nn.Module:
        if options is not None and not isinstance(options, self.options_cls):
            raise ConfigError(
                f"options must be a {self.options_cls.__name__}, got {type(options).__name__}; "
                f"pass {self.options_cls.__name__}(...) (or None for the paper's defaults)"
            )
        opts = options if options is not None else self.options_cls()
        opts.validate()
        names = position_names(at)
        model = attach(model, self._blocks(names, num_classes, opts), names, input_shape)
        if self._finish is not None:
            self._finish(model, opts)
        return model

    def __reduce__(self) -> str:
        return self.__name__  # pickled by reference, like a function

    def __repr__(self) -> str:
        return f"<defence attach function {self.__name__}>"
