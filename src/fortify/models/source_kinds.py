"""The built-in model sources of :mod:`fortify.models.sources`: ``torchvision:``, ``timm:``,
``robustbench:`` and ``python:`` (see there for the syntax, normalisation and weights rules).
Each one turns ``(what, num_classes, in_channels, kwargs, load_weights)`` into a
:class:`~fortify.models.sources.Built` network; nothing is downloaded unless asked."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from fortify.errors import CheckpointError, ConfigError
from fortify.models.sources import Built, register_source


def _no_such_model(
    library: str, what: str, known: Sequence[str], cutoff: float, tail: str
) -> ConfigError:
    """``<library> has no model <what>``, with close matches among ``known``, then ``tail``."""
    close = difflib.get_close_matches(what, known, n=5, cutoff=cutoff)
    return ConfigError(
        f"{library} has no model {what!r}"
        + (f"; did you mean: {', '.join(close)}" if close else "")
        + tail
    )


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
        raise _no_such_model(
            "torchvision", what, known, 0.5, f". torchvision models: {', '.join(sorted(known))}"
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
        raise _no_such_model(
            "timm", what, timm.list_models(), 0.6, " (timm.list_models() lists them)"
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
