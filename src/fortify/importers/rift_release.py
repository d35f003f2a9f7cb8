"""``fortify import rift-release PATH --out DIR``: import the RiFT authors' checkpoints.

Facts of the release (Zhu et al., ICCV 2023) this importer relies on:

* **Networks**: kuangliu-style ResNet-18/34 (``conv1, bn1, layer1..4, linear``; shortcut
  ``shortcut.0/.1``) and the Bag-of-Tricks WRN-34-10 (``conv1, block1, sub_block1, block2,
  block3, bn1, fc``) — fortify's names already. The head depends on the input size: ResNet
  ``avg_pool2d(·, 4)`` into ``Linear(512·(size//32)², K)``, WRN ``avg_pool2d(·, 8)`` into
  ``Linear(640·(size//32)², K)``. At 32×32 (CIFAR) that is global pooling; at 64×64
  (Tiny-ImageNet) it is a 2×2 grid flattened channel-major (ResNet 2048 inputs, WRN 2560),
  which fortify builds with the backbone option ``pool_grid: 2``.
* **Normalisation outside the network**: the data transforms normalise with the CIFAR mean/std
  (0.4914, 0.4822, 0.4465) / (0.2471, 0.2435, 0.2616) for CIFAR-10 and CIFAR-100 and the
  ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for Tiny-ImageNet; the saved
  network expects normalised inputs. The importer puts that normalisation inside the model
  (``normalize`` buffers), so the model maps [0, 1] images to the release's logits and ε stays
  in pixel units. A file that carries its own normaliser (an ``nn.Sequential`` whose ``0.mean``
  / ``0.std`` precede the network ``1.…``) keeps that one.
* **Wrapping**: on CUDA the network is an ``nn.DataParallel`` (``module.`` prefix); files hold
  the state dict bare or as ``{"net"|"state_dict"|"model": ...}`` (fine-tuned ``best_params``
  add ``acc``/``epoch``).
* **Tiny-ImageNet classes**: the release reads ``train/`` and regrouped ``val/`` with
  torchvision ``ImageFolder``, so class k is the k-th WordNet id in **sorted** order (not
  ``wnids.txt`` order); the imported run's data config sets ``class_order: sorted``.

The importer detects the architecture, width, classes and head layout from the tensors, refuses
layouts it cannot rebuild exactly, and writes a fortify run directory whose ``best`` checkpoint
``fortify rift`` and ``fortify eval`` use. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any

NAME = "rift-release"
HELP = "checkpoint released with the RiFT paper (ResNet-18/34, WRN-34-10; wrapped state_dict)"
DESCRIPTION = (
    "Convert an adversarially trained checkpoint from the RiFT authors' release into a fortify "
    "run directory (checkpoints/best + config), read safely with torch.load(weights_only=True). "
    "DataParallel 'module.' and Sequential '1.' prefixes are removed. The release normalises "
    "outside the network (CIFAR mean/std for cifar10/cifar100, ImageNet mean/std for "
    "tiny-imagenet); the importer puts that normalisation inside the model, so the run maps "
    "[0, 1] images to the release's logits (a file with its own 0.mean/0.std keeps those)."
)

ARCHS = ("resnet18", "resnet34", "wrn-34-10")
DATASETS = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64}
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RELEASE_NORMALIZATION = {  # the release's data transforms, per dataset
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "cifar100": (CIFAR_MEAN, CIFAR_STD),
    "tiny-imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
NORMALIZATIONS = ("auto", "release", "none")
CLASS_ORDER = {"tiny-imagenet": "sorted"}  # torchvision ImageFolder order in the release
_PREFIX = re.compile(r"^(?:module\.|\d+\.)")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the release's .pth file")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--arch", choices=ARCHS, default=None, help="default: detected")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="cifar10",
        help="dataset the model was trained on (sets the release's normalisation, input size "
        "and class order)",
    )
    parser.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default="auto",
        help="input normalisation put inside the model: auto (the file's own 0.mean/0.std if "
        "it has them, else the release's for --dataset), release (always the release's), none "
        "(the network was trained on [0, 1] inputs)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="move an existing OUT folder aside (never deletes)"
    )


def run(args: argparse.Namespace) -> int:
    from fortify.runs import read_sidecar

    target = import_rift_release(
        args.path,
        args.out,
        arch=args.arch,
        dataset=args.dataset,
        overwrite=args.overwrite,
        normalization=args.normalization,
    )
    src = read_sidecar(target)["source"]
    print(f"input normalisation inside the model: {src['normalization']}")
    print(f"classifier head: {src['head']}")
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
    """(arch, model kwargs, num_classes, in_channels) from the tensor names and shapes.

    ``kwargs`` include ``pool_grid`` (1: global pooling, 2: the 64×64 release head), read from
    the classifier's input width.
    """
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
        kwargs: dict[str, Any] = {"sub_block1": any(k.startswith("sub_block1.") for k in net)}
        last = "block3.layer.0.conv2.weight"
    elif "layer1.0.conv1.weight" in net:
        head = "linear.weight"
        blocks3 = {int(m.group(1)) for k in net if (m := re.match(r"layer3\.(\d+)\.", k))}
        arch = "resnet34" if len(blocks3) == 6 else "resnet18"
        kwargs = {"width": int(net["conv1.weight"].shape[0])}
        last = "layer4.0.conv2.weight"
    else:
        raise CheckpointError(
            "unrecognised architecture: neither layer1.0.* (ResNet) nor block1.layer.0.* (WRN)"
        )
    if head not in net:
        raise CheckpointError(f"{arch} checkpoint lacks its classifier {head!r}")
    if last not in net:
        raise CheckpointError(f"{arch} checkpoint lacks {last!r}")
    feat, inputs = int(net[last].shape[0]), int(net[head].shape[1])
    grid = math.isqrt(inputs // feat) if inputs % feat == 0 else 0
    if grid < 1 or grid * grid * feat != inputs:
        raise CheckpointError(
            f"{arch}: the classifier {head!r} takes {inputs} inputs, which is not "
            f"{feat}·g² for a g×g pooled grid of the {feat}-channel features; this head layout "
            "cannot be rebuilt"
        )
    kwargs["pool_grid"] = grid
    return arch, kwargs, int(net[head].shape[0]), in_ch


def check_head(arch: str, grid: int, dataset: str) -> str:
    """The head's description; CheckpointError when the release could not have run it on
    ``dataset``'s images (its head is sized for (size // 32)² pooled cells)."""
    from fortify.errors import CheckpointError

    side = DATASETS[dataset]
    if grid != side // 32:
        raise CheckpointError(
            f"{arch}: the classifier is sized for a {grid}×{grid} pooled grid, i.e. "
            f"{32 * grid}×{32 * grid} inputs in the release (its head pools to (size // 32)² "
            f"cells), but --dataset {dataset} has {side}×{side} images; pass the dataset the "
            "checkpoint was trained on"
        )
    if grid == 1:
        return "global average pool"
    kernel = 4 if arch.startswith("resnet") else 8
    return (
        f"the release's {side}×{side} head: avg_pool2d(·, {kernel}) to a {grid}×{grid} grid, "
        "flattened channel-major into the classifier (model option pool_grid: 2)"
    )


def import_rift_release(
    path: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    dataset: str = "cifar10",
    overwrite: bool = False,
    normalization: str = "auto",
) -> Path:
    """Import the release checkpoint at ``path`` into the run directory ``out``.

    Args:
        dataset: the data the checkpoint was trained on; selects the release's normalisation,
            the input size (its head layout) and, for tiny-imagenet, the class order.
        normalization: ``auto`` (the file's own ``0.mean``/``0.std`` if present, else the
            release's for ``dataset``), ``release`` or ``none``.
    Returns:
        The path of ``checkpoints/best.safetensors``; its sidecar's ``source`` says which
        normalisation and head were used.
    """
    import torch

    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig
    from fortify.errors import CheckpointError, ConfigError
    from fortify.factory import build_model
    from fortify.runs import RunDir, apply_state, save_checkpoint

    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of the release's: {sorted(DATASETS)}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization {normalization!r} is not one of {list(NORMALIZATIONS)}")
    RunDir.check_can_open(out, "overwrite" if overwrite else "new")
    net, mean, std = normalise_keys(read_state(path))
    found, kwargs, num_classes, in_ch = detect(net)
    if arch is not None and arch != found:
        raise CheckpointError(f"--arch {arch} given but the checkpoint looks like {found}")
    if (mean is None) != (std is None):
        raise CheckpointError("the checkpoint has a normalisation mean without std (or vice versa)")
    head = check_head(found, kwargs["pool_grid"], dataset)
    if normalization == "auto" and mean is not None:
        how = f"the file's own normaliser (mean {mean}, std {std})"
    elif normalization == "none":
        mean = std = None
        how = "none (the network takes [0, 1] inputs)"
    else:
        mean, std = (list(v) for v in RELEASE_NORMALIZATION[dataset])
        how = f"the release's {dataset} data transform (mean {mean}, std {std})"
    log.info("input normalisation: %s", how)
    data: dict[str, Any] = {"name": dataset}
    if dataset in CLASS_ORDER:
        data["options"] = {"class_order": CLASS_ORDER[dataset]}
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": f"rift-release-{found}-{dataset}",
            "data": data,
            "model": {"name": found, "kwargs": kwargs, "mean": mean, "std": std},
            "train": {"objective": "at", "attack": {"eps": 8 / 255, "step_size": 2 / 255}},
        },
    )
    side = DATASETS[dataset]
    shape = (in_ch, side, side)
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
        "source": {
            "kind": NAME,
            "path": str(Path(path).resolve()),
            "arch": found,
            "normalization": how,
            "head": head,
        },
    }
    save_checkpoint(target, model, meta)
    if hasattr(run_dir, "set_state"):
        run_dir.set_state("finished")
    run_dir.close()
    log.info("imported %s (%s, %d classes) -> %s", path, found, num_classes, target)
    return Path(target)
