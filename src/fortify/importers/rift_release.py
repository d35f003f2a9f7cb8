"""``fortify import rift-release PATH --out DIR``: import the RiFT authors' AT checkpoints.

The release trains kuangliu-style ResNet-18/34 (``conv1, bn1, layer1..4, linear``; shortcut
``shortcut.0/.1``) and the Bag-of-Tricks WRN-34-10 (``conv1, block1, sub_block1, block2,
block3, bn1, fc``) — fortify's names already — but saves them wrapped:

* ``nn.DataParallel`` adds ``module.``;
* the normalisation is a separate first module of an ``nn.Sequential`` (``0.mean``,
  ``0.std``), so the network's keys start with ``1.`` (``1.module.conv1.weight`` or
  ``module.1.conv1.weight`` depending on the wrapping order).

This importer strips those prefixes, moves the normalisation's mean/std into the model's own
``normalize`` buffers (so the model still maps [0, 1] images to logits and ε stays in pixel
units), detects the architecture and the number of classes from the tensors, and writes a
fortify run directory whose ``best`` checkpoint ``fortify rift`` and ``fortify eval`` can use.
Files are read with ``torch.load(weights_only=True)`` (nothing is unpickled).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

NAME = "rift-release"
HELP = "checkpoint released with the RiFT paper (ResNet-18/34, WRN-34-10; wrapped state_dict)"
DESCRIPTION = (
    "Convert an adversarially trained checkpoint from the RiFT authors' release into a fortify "
    "run directory (checkpoints/best + config), read safely with torch.load(weights_only=True). "
    "DataParallel 'module.' and Sequential '1.' prefixes are removed; a separate normalisation "
    "wrapper's mean/std become the model's in-model normalisation."
)

ARCHS = ("resnet18", "resnet34", "wrn-34-10")
DATASETS = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64}
_PREFIX = re.compile(r"^(?:module\.|\d+\.)")

log = logging.getLogger("fortify.importers.rift_release")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the release's .pth file")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--arch", choices=ARCHS, default=None, help="default: detected")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="cifar10",
        help="dataset the model was trained on",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="move an existing OUT folder aside (never deletes)"
    )


def run(args: argparse.Namespace) -> int:
    target = import_rift_release(
        args.path, args.out, arch=args.arch, dataset=args.dataset, overwrite=args.overwrite
    )
    print(f"wrote {target}")
    return 0


def read_state(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` and unwrap ``{"state_dict"|"model"|"net": ...}``."""

    p = Path(path)
    from fortify.importers._release import read_release_state_dict

    obj = read_release_state_dict(p, "expected a saved state_dict")
    return dict(obj)


def normalise_keys(
    state: dict[str, Any],
) -> tuple[dict[str, Any], list[float] | None, list[float] | None]:
    """Strip ``module.`` / ``<i>.`` prefixes; split off a wrapper's ``mean``/``std``.

    Returns (network state with fortify names, mean or None, std or None).
    """
    from fortify.errors import CheckpointError

    net: dict[str, Any] = {}
    mean = std = None
    for key, value in state.items():
        k = key
        while _PREFIX.match(k):
            k = _PREFIX.sub("", k, count=1)
        if k in ("mean", "std") or (
            k.startswith(("normalize.", "norm.")) and k.endswith(("mean", "std"))
        ):
            vals = [float(v) for v in value.flatten()]
            if k.endswith("mean"):
                mean = vals
            else:
                std = vals
            continue
        if k in net:
            raise CheckpointError(f"two release keys map to {k!r} after removing prefixes")
        net[k] = value
    return net, mean, std


def detect(net: dict[str, Any]) -> tuple[str, dict[str, Any], int, int]:
    """(arch, model kwargs, num_classes, in_channels) from the tensor names and shapes."""
    from fortify.errors import CheckpointError

    if "conv1.weight" not in net:
        raise CheckpointError(
            f"no conv1.weight after removing prefixes; keys start with {sorted(net)[:6]} — not a "
            f"RiFT release ResNet/WRN ({', '.join(ARCHS)})"
        )
    in_ch = int(net["conv1.weight"].shape[1])
    if "block1.layer.0.conv1.weight" in net:
        head = "fc.weight"
        arch = "wrn-34-10"
        kwargs = {"sub_block1": any(k.startswith("sub_block1.") for k in net)}
    elif "layer1.0.conv1.weight" in net:
        head = "linear.weight"
        blocks3 = {int(m.group(1)) for k in net if (m := re.match(r"layer3\.(\d+)\.", k))}
        arch = "resnet34" if len(blocks3) == 6 else "resnet18"
        kwargs = {"width": int(net["conv1.weight"].shape[0])}
    else:
        raise CheckpointError(
            "unrecognised architecture: neither layer1.0.* (ResNet) nor block1.layer.0.* (WRN)"
        )
    if head not in net:
        raise CheckpointError(f"{arch} checkpoint lacks its classifier {head!r}")
    return arch, kwargs, int(net[head].shape[0]), in_ch


def import_rift_release(
    path: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    dataset: str = "cifar10",
    overwrite: bool = False,
) -> Path:
    """Import the release checkpoint at ``path`` into the run directory ``out``.

    Returns:
        The path of ``checkpoints/best.safetensors``.
    """
    import torch

    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig
    from fortify.errors import CheckpointError, ConfigError
    from fortify.factory import build_model
    from fortify.runs import RunDir, apply_state, save_checkpoint

    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of the release's: {sorted(DATASETS)}")
    RunDir.check_can_open(out, "overwrite" if overwrite else "new")
    net, mean, std = normalise_keys(read_state(path))
    found, kwargs, num_classes, in_ch = detect(net)
    if arch is not None and arch != found:
        raise CheckpointError(f"--arch {arch} given but the checkpoint looks like {found}")
    if (mean is None) != (std is None):
        raise CheckpointError("the checkpoint has a normalisation mean without std (or vice versa)")
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": f"rift-release-{found}-{dataset}",
            "data": {"name": dataset},
            "model": {"name": found, "kwargs": kwargs, "mean": mean, "std": std},
            "train": {"objective": "at", "attack": {"eps": 8 / 255, "step_size": 2 / 255}},
        },
    )
    size = DATASETS[dataset]
    shape = (in_ch, size, size)
    model = build_model(cfg.model, cfg.defenses, num_classes, shape)
    if mean is not None:
        net["normalize.mean"] = torch.tensor(mean).view(1, -1, 1, 1)
        net["normalize.std"] = torch.tensor(std).view(1, -1, 1, 1)
    apply_state(model, net, strict=True, source=f"release checkpoint {Path(path).name}")
    model.eval()
    with torch.no_grad():
        logits = model(torch.full((2, *shape), 0.5))
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"the imported {found} model produces non-finite logits")
    cfg_dict = to_dict(cfg)
    run_dir = RunDir.open(out, mode="overwrite" if overwrite else "new", config=cfg_dict)
    target = run_dir.checkpoint_path("best")
    meta = {
        "config": cfg_dict,
        "num_classes": num_classes,
        "image_shape": list(shape),
        "tag": "best",
        "source": {"kind": NAME, "path": str(Path(path).resolve()), "arch": found},
    }
    save_checkpoint(target, model, meta)
    if hasattr(run_dir, "set_state"):
        run_dir.set_state("finished")
    run_dir.close()
    log.info("imported %s (%s, %d classes) -> %s", path, found, num_classes, target)
    return Path(target)
