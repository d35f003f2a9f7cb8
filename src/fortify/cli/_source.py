"""``--model SOURCE [--weights FILE] --dataset NAME``: commands on a model that is not a run.

SOURCE is any ``model.name``: a registered backbone (``resnet18``) or a model source
(``torchvision:<name>``, ``timm:<name>``, ``robustbench:<dataset>/<threat>/<model>``,
``python:<module>:<callable>``); see ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parser is built without importing torch
    import torch
    from torch import nn


def add_source_arguments(parser: argparse.ArgumentParser, need_dataset: bool = True) -> None:
    g = parser.add_argument_group(
        "a model that is not a fortify run",
        "SOURCE = a backbone (resnet18) or torchvision:<name> | timm:<name> | "
        "robustbench:<dataset>/<threat>/<model> | python:<module>:<callable>",
    )
    g.add_argument("--model", metavar="SOURCE", default=None, help="model to use instead of a run")
    g.add_argument(
        "--weights",
        metavar="FILE",
        default=None,
        help="weights for --model: .safetensors, or a .pth state dict (read with "
        "weights_only=True; 'module.'/'model.' prefixes and state_dict/net/model wrappers are "
        "handled); unset: the source's own weights (e.g. --model-arg weights=DEFAULT)",
    )
    g.add_argument(
        "--model-arg",
        dest="model_args",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="option for --model (repeatable, value parsed as YAML), e.g. weights=DEFAULT",
    )
    g.add_argument("--mean", type=float, nargs="+", default=None, help="input mean per channel")
    g.add_argument("--std", type=float, nargs="+", default=None, help="input std per channel")
    if need_dataset:
        g.add_argument("--dataset", default=None, help="dataset for --model (e.g. cifar10)")


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: yaml(v)}`` (ConfigError on a malformed item or a value that is
    not valid YAML, parsed as ``fortify train``'s overrides are: ``lr=5e-4`` is a number)."""
    from fortify.config.loader import _parse_scalar, plain
    from fortify.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg {item!r} must look like KEY=VALUE")
        out[key.strip()] = plain(_parse_scalar(value, f"--model-arg {item}")) if value else None
    return out


def build_source_model(
    args: argparse.Namespace, num_classes: int, image_shape: tuple[int, ...], data: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    from fortify.runs.external import load_source_model

    return load_source_model(
        args.model,
        num_classes=num_classes,
        image_shape=image_shape,
        weights=args.weights,
        kwargs=parse_model_args(args.model_args),
        mean=args.mean,
        std=args.std,
        data=data,
        device=args.device,
    )


def source_target(args: argparse.Namespace) -> Path:
    """What ``fortify eval --model`` names as its target: ``--weights``, else ``runs/<model>``
    (reports go to ``<target>/reports``). Only a path: nothing is created here, the report
    writer makes the folder when it writes, so a refused or failed evaluation leaves none."""
    if args.weights is not None:
        return Path(args.weights)
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "-", args.model)


def check_source_args(args: argparse.Namespace) -> None:
    """Refuse ``fortify eval --model`` options that cannot work, before anything is loaded."""
    from fortify.errors import ConfigError

    if args.target is not None:
        raise ConfigError("give either TARGET or --model, not both")
    if not args.dataset:
        raise ConfigError("--model needs --dataset NAME (the data the model classifies)")


def load_source_target(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, dict[str, Any], Path]:
    """For ``fortify eval --model``: (model, checkpoint-style meta, :func:`source_target`).
    Reads files, writes none."""
    from fortify.data import load_from_config

    check_source_args(args)
    data = {"name": args.dataset, "root": args.data_root}
    splits = load_from_config(data, subsets=False)
    model, meta = build_source_model(args, splits.num_classes, tuple(splits.image_shape), data)
    return model.to(device), meta, source_target(args)
