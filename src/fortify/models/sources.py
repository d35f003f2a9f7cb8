"""Model sources: networks that fortify does not define, under the one ``model.name`` syntax.

``create("<source>:<what>", num_classes, in_channels, mean=None, std=None, **kwargs)`` builds

=====================================  ==========================================================
name                                   network
=====================================  ==========================================================
``torchvision:<name>``                 ``torchvision.models.get_model(name, **kwargs)``;
                                       ``weights=<enum member>`` (e.g. ``DEFAULT``) for
                                       pretrained weights
``timm:<name>``                        ``timm.create_model(name, **kwargs)`` (``fortify[timm]``);
                                       ``pretrained=true`` with ``pretrained_file=PATH`` or
                                       ``download=true``
``robustbench:<dataset>/<threat>/<m>`` the ``robustbench`` package's own architecture of zoo
                                       entry ``m`` with the weights file from its local model
                                       directory (``model_dir``, default ``./models``)
``python:<module>:<callable>``         ``callable(**kwargs)`` from the user's code (also given
                                       ``num_classes`` / ``in_channels`` when it accepts them)
=====================================  ==========================================================

Every source becomes a normal fortify model: images in [0, 1] (N, C, H, W) → logits (N, K).
The network keeps its own module names (``layer4`` of a torchvision ResNet is still
``layer4``, so defences attach by those names) and its own state-dict keys; fortify adds a
``normalize`` submodule (a :class:`~fortify.models.registry.Normalize`, applied by a forward
pre-hook before the network's own ``forward``) and a forward hook that turns tuple/dict outputs
(torchvision's Inception/GoogLeNet in training mode) into plain logits. Plain containers
(``nn.Sequential`` …) are wrapped instead (:class:`SourceNet`, names gain ``net.``), because a
container would run an added child as a layer.

Normalisation comes from, in order: ``mean``/``std`` given to :func:`create` (config
``model.mean``/``model.std``); the source's pretrained configuration (torchvision weights'
transforms, timm's ``pretrained_cfg``) when its pretrained weights are loaded; otherwise none
(mean 0, std 1). RobustBench models normalise inside their own wrappers, so fortify adds none.
``normalize.mean``/``normalize.std`` are buffers, so a checkpoint carries them and rebuilding
does not need the pretrained weights again.

Nothing is downloaded unless the source's kwargs say ``download: true``; a missing file raises
:class:`~fortify.errors.CheckpointError` saying which file to put where.

``load_weights=False`` (used when a fortify checkpoint is rebuilt) builds the architecture only:
the checkpoint overwrites every tensor anyway.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from fortify.errors import CheckpointError, ConfigError, DataError, FortifyError
from fortify.registry import Registry

log = logging.getLogger(__name__)

SEPARATOR = ":"


@dataclass
class Built:
    """What a source builder returns: the network and the normalisation its weights expect."""

    module: nn.Module
    mean: list[float] | None = None
    std: list[float] | None = None
    origin: str = ""  # where mean/std came from, for the log


SourceBuilder = Callable[[str, int, int, dict[str, Any], bool], Built]


@dataclass(frozen=True)
class Source:
    """A registered source: ``builder(what, num_classes, in_channels, kwargs, load_weights)``."""

    prefix: str
    builder: SourceBuilder
    syntax: str
    description: str


#: Every model source, by prefix (the sources below register at import).
SOURCES: Registry[Source] = Registry("model source")


def register_source(
    prefix: str, *, syntax: str, description: str
) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator registering a model source under ``<prefix>:...``."""

    def deco(fn: SourceBuilder) -> SourceBuilder:
        SOURCES.register(prefix, Source(prefix, fn, syntax, description))
        return fn

    return deco


def is_source(name: str) -> bool:
    """True for ``<source>:<...>`` names (registered backbones never contain ':')."""
    return isinstance(name, str) and SEPARATOR in name


def available_sources() -> dict[str, str]:
    """``{prefix: syntax}`` of every model source."""
    return {p: s.syntax for p, s in SOURCES.items()}


def split_source(name: str) -> tuple[Source, str]:
    """(source, the part after ``<prefix>:``) or a :class:`ConfigError` listing the sources."""
    prefix, _, what = name.partition(SEPARATOR)
    if prefix not in SOURCES:
        raise ConfigError(
            f"unknown model source {prefix!r} in model name {name!r}; sources: "
            + ", ".join(s.syntax for _, s in SOURCES.items())
            + " (or a registered backbone name without ':')"
        )
    if not what:
        raise ConfigError(
            f"model name {name!r} is incomplete; expected {SOURCES.get(prefix).syntax}"
        )
    return SOURCES.get(prefix), what


def source_description(name: str) -> str:
    """One line describing source model ``name`` (for listings and the ModelSpec)."""
    src, _ = split_source(name)
    return src.description


# --------------------------------------------------------------------------- the adaptation


class SourceNet(nn.Module):
    """Wrapper for a plain-container source (``nn.Sequential`` …): ``normalize`` then ``net``."""

    def __init__(self, net: nn.Module, normalize: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _normalize_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: ``model(x)`` first computes ``model.normalize(x)``."""
    if not args:
        return None
    return (module.normalize(args[0]), *args[1:])


def plain_logits(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
    """Forward hook: tuple / namedtuple / dict outputs → the logits tensor, else a DataError."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise DataError(
        f"{type(module).__name__} returned a {type(output).__name__}, not logits; fortify models "
        "must map images to a logits tensor (N, K) — wrap the network so forward returns logits"
    )


def adapt(
    net: nn.Module,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """Give ``net`` fortify's in-model ``normalize`` and plain-logits output (see module doc)."""
    from fortify.models.registry import Normalize

    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    normalize = Normalize(mean, std)
    if isinstance(net, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        model: nn.Module = SourceNet(net, normalize)
    else:
        taken = getattr(net, "normalize", None)
        if taken is not None:
            raise ConfigError(
                f"{type(net).__name__} already has an attribute 'normalize' "
                f"({type(taken).__name__}); fortify keeps its input normalisation there — rename "
                "the attribute in your network"
            )
        net.normalize = normalize
        net.register_forward_pre_hook(_normalize_input)
        model = net
    model.register_forward_hook(plain_logits)
    return model


def build(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    kwargs: dict[str, Any],
    load_weights: bool = True,
) -> nn.Module:
    """Build source model ``name``; see the module docstring. ``mean``/``std`` override the
    source's own normalisation."""
    src, what = split_source(name)
    try:
        built = src.builder(what, num_classes, in_channels, dict(kwargs), load_weights)
    except FortifyError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot build model {name!r} with options {kwargs}: {exc}") from exc
    if not isinstance(built.module, nn.Module):
        raise ConfigError(
            f"model {name!r} produced a {type(built.module).__name__}, not a torch.nn.Module"
        )
    if mean is not None and std is not None:
        use_mean, use_std, origin = list(mean), list(std), "model.mean/model.std"
    elif built.mean is not None and built.std is not None:
        use_mean, use_std, origin = built.mean, built.std, built.origin
    else:
        use_mean, use_std, origin = None, None, "none"
    if use_mean is None:
        log.info("model %s: no input normalisation (inputs stay in [0, 1])", name)
    else:
        log.info(
            "model %s: input normalisation from %s: mean %s, std %s",
            name,
            origin,
            use_mean,
            use_std,
        )
    return adapt(built.module, in_channels, use_mean, use_std)


def check_logits(
    model: nn.Module, name: str, num_classes: int, image_shape: tuple[int, int, int]
) -> None:
    """One forward pass (eval mode, no grad): raise :class:`ConfigError` unless the output is
    (N, num_classes) logits for (N, C, H, W) = (2, *image_shape) inputs."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, *image_shape, device=device))
    except FortifyError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r} cannot process images of shape (C, H, W) = {tuple(image_shape)}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(
            f"model {name!r} returns an output of shape {tuple(out.shape)} for 2 images; expected "
            f"logits of shape (2, {num_classes}) — check its num_classes / head"
        )


# --------------------------------------------------------------------------- helpers


def _pop_bool(kwargs: dict[str, Any], key: str, name: str) -> bool:
    value = kwargs.pop(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"model {name!r}: option {key} must be true or false, got {value!r}")
    return value


def _require(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ConfigError(
            f"{what} needs the Python package {module!r}, which is not installed; install it "
            f"with: pip install 'fortify[{extra}]'"
        ) from exc


def _three_channels(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ConfigError(
            f"model {name!r} takes RGB images (3 channels) but the data has {in_channels}; use "
            "an RGB dataset or a model built for that channel count"
        )


# --------------------------------------------------------------------------- torchvision


@register_source(
    "torchvision",
    syntax="torchvision:<name>",
    description="torchvision.models.get_model(<name>, **kwargs); weights=<member> loads "
    "pretrained weights from the torch hub cache (download: true to fetch them)",
)
def _torchvision(
    what: str, num_classes: int, in_channels: int, kwargs: dict[str, Any], load_weights: bool
) -> Built:
    import torchvision.models as tvm

    name = f"torchvision:{what}"
    known = tvm.list_models()
    if what not in known:
        close = difflib.get_close_matches(what, known, n=5, cutoff=0.5)
        raise ConfigError(
            f"torchvision has no model {what!r}"
            + (f"; did you mean: {', '.join(close)}" if close else "")
            + f". torchvision models: {', '.join(sorted(known))}"
        )
    _three_channels(name, in_channels)
    download = _pop_bool(kwargs, "download", name)
    weights_name = kwargs.pop("weights", None)
    if weights_name is None:
        return Built(tvm.get_model(what, weights=None, num_classes=num_classes, **kwargs))
    enum = tvm.get_model_weights(what)
    members = [*enum.__members__]
    if weights_name not in members:
        raise ConfigError(
            f"{name}: weights {weights_name!r} do not exist; choose one of {members} "
            "(or leave weights unset for random initialisation)"
        )
    weights = enum[weights_name]
    transform = weights.transforms()
    mean, std = list(transform.mean), list(transform.std)
    origin = f"torchvision weights {weights}"
    if not load_weights:
        return Built(
            tvm.get_model(what, weights=None, num_classes=num_classes, **kwargs), mean, std, origin
        )
    classes = len(weights.meta.get("categories") or []) or None
    if classes is not None and classes != num_classes:
        raise ConfigError(
            f"{name}: weights {weights} have {classes} classes but the model needs {num_classes}; "
            "use a dataset with the same classes, or leave weights unset"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file() and not download:
        raise CheckpointError(
            f"{name}: pretrained weights {weights} are not on this machine; put the file "
            f"{cached.name} (from {weights.url}) at {cached}, or set the model option "
            "download: true where the network allows"
        )
    return Built(tvm.get_model(what, weights=weights, **kwargs), mean, std, origin)


# --------------------------------------------------------------------------- timm


@register_source(
    "timm",
    syntax="timm:<name>",
    description="timm.create_model(<name>, **kwargs) (pip install 'fortify[timm]'); "
    "pretrained: true with pretrained_file: PATH (or download: true)",
)
def _timm(
    what: str, num_classes: int, in_channels: int, kwargs: dict[str, Any], load_weights: bool
) -> Built:
    timm = _require("timm", "timm", "model source timm:")
    name = f"timm:{what}"
    if not timm.is_model(what):
        close = difflib.get_close_matches(what, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(
            f"timm has no model {what!r}"
            + (f"; did you mean: {', '.join(close)}" if close else "")
            + " (timm.list_models() lists them)"
        )
    download = _pop_bool(kwargs, "download", name)
    pretrained = _pop_bool(kwargs, "pretrained", name)
    pretrained_file = kwargs.pop("pretrained_file", None)
    if pretrained_file is not None and not pretrained:
        raise ConfigError(f"{name}: pretrained_file needs pretrained: true")
    kwargs.setdefault("in_chans", in_channels)
    if not load_weights:
        kwargs.pop("checkpoint_path", None)
    elif kwargs.get("checkpoint_path") and not Path(kwargs["checkpoint_path"]).is_file():
        raise CheckpointError(
            f"{name}: checkpoint_path {kwargs['checkpoint_path']!r} does not exist"
        )
    overlay = None
    if pretrained and load_weights:
        if pretrained_file is not None:
            if not Path(pretrained_file).is_file():
                raise CheckpointError(f"{name}: pretrained_file {pretrained_file!r} does not exist")
            overlay = {"file": str(pretrained_file)}
        elif not download:
            raise CheckpointError(
                f"{name}: timm's pretrained weights come from the Hugging Face hub, and nothing "
                "is downloaded unless asked: put a local copy of the weights file somewhere and "
                "set the model option pretrained_file: PATH, or set download: true where the "
                "network allows"
            )
    module = timm.create_model(
        what,
        pretrained=pretrained and load_weights,
        pretrained_cfg_overlay=overlay,
        num_classes=num_classes,
        **kwargs,
    )
    if not pretrained:
        return Built(module)
    cfg = getattr(module, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return Built(module)
    if len(mean) != in_channels:  # timm averages/repeats the first conv for other channel counts
        mean = [sum(mean) / len(mean)] * in_channels
        std = [sum(std) / len(std)] * in_channels
    return Built(module, list(mean), list(std), f"timm pretrained_cfg of {what}")


# --------------------------------------------------------------------------- RobustBench


def import_robustbench() -> Any:
    """Import ``robustbench`` (``pip install 'fortify[robustbench]'``).

    robustbench 1.1.1 imports ``autoattack`` (the module name of the AutoAttack authors' git
    package), while PyPI's ``pyautoattack`` — the same code, installed with fortify — provides
    it as ``pyautoattack``; when ``autoattack`` is absent it is aliased to ``pyautoattack``.
    robustbench also imports ``pkg_resources`` (setuptools < 81).
    """
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack"):
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        with warnings.catch_warnings():  # its imports of pkg_resources and old timm paths warn
            warnings.simplefilter("ignore")
            import robustbench  # noqa: F401
            import robustbench.utils
            from robustbench.model_zoo import model_dicts  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "robustbench":
            raise ConfigError(
                "model source robustbench: needs the Python package 'robustbench', which is not "
                "installed; install it with: pip install 'fortify[robustbench]'"
            ) from exc
        if exc.name == "pkg_resources":
            raise ConfigError(
                "robustbench imports pkg_resources, which setuptools >= 81 no longer has; "
                "install it with: pip install 'setuptools<81' (or 'fortify[robustbench]')"
            ) from exc
        raise ConfigError(f"robustbench cannot be imported: {exc}") from exc
    return robustbench


def robustbench_entry(what: str) -> tuple[Any, Any, str, dict[str, Any]]:
    """Parse ``<dataset>/<threat>/<model>`` → (BenchmarkDataset, ThreatModel, model, zoo entry)."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    parts = what.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(
            f"robustbench model {what!r} must be <dataset>/<threat>/<model>, e.g. "
            "cifar10/Linf/Carmon2019Unlabeled"
        )
    dataset, threat, model_name = parts
    datasets = [d.value for d in BenchmarkDataset]
    threats = [t.value for t in ThreatModel]
    if dataset not in datasets:
        raise ConfigError(f"robustbench dataset {dataset!r} is not one of {datasets}")
    if threat not in threats:
        raise ConfigError(f"robustbench threat model {threat!r} is not one of {threats}")
    ds, tm = BenchmarkDataset(dataset), ThreatModel(threat)
    zoo = model_dicts[ds].get(tm, {})
    if model_name not in zoo:
        close = difflib.get_close_matches(model_name, list(zoo), n=5, cutoff=0.5)
        raise ConfigError(
            f"RobustBench has no {dataset}/{threat} model {model_name!r}"
            + (f"; did you mean: {', '.join(close)}" if close else "")
            + f" ({len(zoo)} models in that list)"
        )
    return ds, tm, model_name, zoo[model_name]


def robustbench_files(
    model_dir: str | Path, ds: Any, tm: Any, model_name: str, entry: dict
) -> list[Path]:
    """The weight file(s) robustbench's ``load_model`` reads for this entry (ensembles: one per
    member, ``<name>.pt_m<i>.pt``)."""
    base = Path(model_dir) / ds.value / tm.value / f"{model_name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{base}_m{i}.pt") for i in range(len(ids))]
    return [base]


@register_source(
    "robustbench",
    syntax="robustbench:<dataset>/<threat>/<model>",
    description="a RobustBench zoo entry built by the robustbench package (pip install "
    "'fortify[robustbench]'); weights from model_dir/<dataset>/<threat>/<model>.pt",
)
def _robustbench(
    what: str, num_classes: int, in_channels: int, kwargs: dict[str, Any], load_weights: bool
) -> Built:
    ds, tm, model_name, entry = robustbench_entry(what)
    name = f"robustbench:{what}"
    import robustbench.utils as rbu

    _three_channels(name, in_channels)
    expected = rbu.DATASET_CLASSES.get(ds)
    if expected is not None and expected != num_classes:
        raise ConfigError(
            f"{name} has {expected} classes but the data has {num_classes}; evaluate it on "
            f"{ds.value}"
        )
    model_dir = kwargs.pop("model_dir", "./models")
    download = _pop_bool(kwargs, "download", name)
    if kwargs:
        raise ConfigError(
            f"{name}: unknown option(s) {sorted(kwargs)}; allowed: model_dir, download"
        )
    if not load_weights:
        return Built(entry["model"]())
    timm_name = f"{model_name.lower().replace('-', '_')}_{ds.value.lower()}_{tm.value.lower()}"
    timm = importlib.import_module("timm")
    if timm.is_model(timm_name):
        raise ConfigError(
            f"{name} is distributed through timm as {timm_name!r}; use model timm:{timm_name} "
            "with pretrained: true and pretrained_file: PATH"
        )
    files = robustbench_files(model_dir, ds, tm, model_name, entry)
    missing = [p for p in files if not p.is_file()]
    if missing and not download:
        raise CheckpointError(
            f"{name}: the weights file {', '.join(str(p) for p in missing)} is missing. "
            f"RobustBench keeps its models in <model_dir>/{ds.value}/{tm.value}/<model>.pt "
            f"(model_dir = {str(model_dir)!r}; set the model option model_dir: DIR for another "
            f"folder): put the file there (Google Drive id {entry.get('gdrive_id')}), or set "
            "download: true where the network allows"
        )
    return Built(rbu.load_model(model_name, model_dir=str(model_dir), dataset=ds, threat_model=tm))


# --------------------------------------------------------------------------- user code


def import_callable(spec: str) -> Callable[..., Any]:
    """``<module>:<callable>`` (dotted attribute paths allowed) → the callable.

    The current folder is tried too, so ``python:mynets:build`` finds ``./mynets.py`` even when
    started through the ``fortify`` console script.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"python model {spec!r} must be <module>:<callable>, e.g. mynets:build")
    top = module_name.split(".")[0]
    cwd = str(Path.cwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        local = Path(cwd, f"{top}.py").is_file() or Path(cwd, top).is_dir()
        if getattr(exc, "name", None) != top or cwd in sys.path or not local:
            raise ConfigError(
                f"cannot import module {module_name!r} for model python:{spec} ({exc}); put its "
                "folder on PYTHONPATH"
            ) from exc
        sys.path.insert(0, cwd)  # the console script does not search the current folder
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc2:
            raise ConfigError(
                f"cannot import module {module_name!r} for model python:{spec}: {exc2}"
            ) from exc2
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r} (model python:{spec})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"python:{spec} is a {type(obj).__name__}, not a callable")
    return obj


@register_source(
    "python",
    syntax="python:<module>:<callable>",
    description="a factory in your own code, called with the model kwargs (and num_classes / "
    "in_channels when its signature takes them)",
)
def _python(
    what: str, num_classes: int, in_channels: int, kwargs: dict[str, Any], load_weights: bool
) -> Built:
    factory = import_callable(what)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in kwargs:
            raise ConfigError(f"python:{what}: {key} comes from the data; drop it from the kwargs")
        if key in params or takes_any:
            kwargs[key] = value
    return Built(factory(**kwargs))
