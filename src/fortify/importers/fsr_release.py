"""``fortify import fsr-release PATH --arch ARCH --out DIR``: import the FSR authors' checkpoints.

The release saves a plain ``state_dict`` (``torch.save(net.state_dict())``). Its backbone keys
already follow fortify's names (ResNet-18 ``conv1, bn1, layer1..4, linear``; VGG-16
``block0..4.<i>, classifier.{0,2,4}``; WRN-34-10 ``conv1, block1, sub_block1, block2, block3,
bn1, fc``); only the FSR keys move:

=============================  ==================================================
release key                    fortify key
=============================  ==================================================
``separation.sep_net.<i>.*``   ``fortify_defenses.<pos>.separation.<i>.*``
``recalibration.rec_net.<i>.*`` ``fortify_defenses.<pos>.recalibration.<i>.*``
``aux.0.*``                    ``fortify_defenses.<pos>.aux.*``
=============================  ==================================================

where ``<pos>`` is the backbone's default FSR position (``layer4``, ``block3``, ``relu``). The
block is built with the release's numerics (``eps_log=1e-8``, τ = 0.1), so the imported model's
``forward(x)`` returns the release's eval-mode logits. Widths (ResNet ``width``, VGG ``width``,
WRN depth/widen, FSR ``hidden``) and the number of classes are read from the tensor shapes.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

NAME = "fsr-release"
HELP = "checkpoint released with the FSR paper (ResNet-18, VGG-16, WRN-34-10; plain state_dict)"
DESCRIPTION = (
    "Convert a checkpoint from the FSR authors' release (a plain state_dict .pth, read safely "
    "with torch.load(weights_only=True)) into a fortify checkpoint whose model returns the "
    "release's eval-mode logits. The FSR block is rebuilt with the release's 1e-8 epsilons."
)

ARCHS = ("resnet18", "vgg16", "wrn-34-10")
POSITIONS = {"resnet18": "layer4", "vgg16": "block3", "wrn-34-10": "relu"}
SIGNATURES = {  # a key only that architecture's release has
    "resnet18": "layer1.0.conv1.weight",
    "vgg16": "block0.0.weight",
    "wrn-34-10": "block1.layer.0.conv1.weight",
}
HEADS = {"resnet18": "linear.weight", "vgg16": "classifier.4.weight", "wrn-34-10": "fc.weight"}
FSR_PREFIXES = {
    "separation.sep_net.": "separation.",
    "recalibration.rec_net.": "recalibration.",
    "aux.0.": "aux.",
}

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the release's .pth file (a plain state_dict)")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="backbone of the checkpoint")
    parser.add_argument(
        "--out", required=True, help="run directory to create (config + checkpoints/final)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of classes (default: read from the classifier's weight; checked if given)",
    )
    parser.add_argument(
        "--dataset",
        default="cifar10",
        help="dataset the checkpoint was trained on (recorded in the config for `fortify eval`)",
    )
    parser.add_argument("--image-size", type=int, default=32, help="input height = width")
    parser.add_argument("--tau", type=float, default=0.1, help="Gumbel-softmax temperature")
    parser.add_argument(
        "--overwrite", action="store_true", help="move an existing --out folder aside first"
    )


def run(args: argparse.Namespace) -> int:
    out = import_fsr_release(
        args.path,
        args.arch,
        args.out,
        num_classes=args.num_classes,
        dataset=args.dataset,
        image_size=args.image_size,
        tau=args.tau,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a plain state_dict safely (``weights_only=True``); unwrap common wrappers.

    Accepts ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"net": ...}`` wrappers and strips a
    DataParallel ``module.`` prefix.
    """

    path = Path(path)
    from fortify.importers._release import read_release_state_dict

    obj = read_release_state_dict(path, "the FSR release saves torch.save(net.state_dict())")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def detect_arch(state: dict[str, Any]) -> str | None:
    """The release architecture whose signature key ``state`` contains, if any."""
    for arch, key in SIGNATURES.items():
        if key in state:
            return arch
    return None


def infer_settings(state: dict[str, Any], arch: str) -> dict[str, Any]:
    """Backbone name + kwargs, num_classes, in_channels and FSR hidden width from tensor shapes."""
    from fortify.errors import CheckpointError

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"the {arch} release checkpoint lacks key {key!r}")
        return tuple(state[key].shape)

    settings: dict[str, Any] = {"model_kwargs": {}}
    settings["num_classes"] = shape(HEADS[arch])[0]
    if arch == "resnet18":
        w = shape("conv1.weight")
        settings["in_channels"] = w[1]
        settings["model_name"] = "resnet18"
        if w[0] != 64:
            settings["model_kwargs"] = {"width": w[0]}
    elif arch == "vgg16":
        w = shape("block0.0.weight")
        settings["in_channels"] = w[1]
        settings["model_name"] = "vgg16"
        if w[0] != 64:
            settings["model_kwargs"] = {"width": w[0]}
    else:
        w = shape("conv1.weight")
        settings["in_channels"] = w[1]
        pattern = re.compile(r"^block1\.layer\.(\d+)\.")
        n = 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))
        depth = 6 * n + 4
        widen = shape("block1.layer.0.conv1.weight")[0] // 16
        has_sub = any(k.startswith("sub_block1.") for k in state)
        if (depth, widen) == (34, 10):
            settings["model_name"] = "wrn-34-10"
            if not has_sub:
                settings["model_kwargs"] = {"sub_block1": False}
        else:
            settings["model_name"] = "wide-resnet"
            settings["model_kwargs"] = {"depth": depth, "widen": widen, "sub_block1": has_sub}
    sep = "separation.sep_net.0.weight"
    settings["has_fsr"] = any(k.startswith(tuple(FSR_PREFIXES)) for k in state)
    settings["hidden"] = shape(sep)[0] if settings["has_fsr"] else None
    return settings


def map_keys(state: dict[str, Any], position: str) -> dict[str, Any]:
    """Rename the release's FSR keys to fortify's; backbone keys are unchanged."""
    from fortify.defenses.attach import DEFENSES_ATTR, defence_key

    out: dict[str, Any] = {}
    base = f"{DEFENSES_ATTR}.{defence_key(position)}."
    for key, value in state.items():
        for old, new in FSR_PREFIXES.items():
            if key.startswith(old):
                key = base + new + key[len(old) :]
                break
        out[key] = value
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- importing


def build_release_model(
    state: dict[str, Any],
    arch: str,
    *,
    num_classes: int | None = None,
    dataset: str = "cifar10",
    image_size: int = 32,
    tau: float = 0.1,
) -> tuple[Any, dict[str, Any], tuple[int, int, int]]:
    """Build the fortify model for a release state_dict and load it (strictly).

    Returns:
        (model in eval mode, ExperimentConfig dict that rebuilds it via ``fortify.factory``,
        image shape (C, H, W)).
    Raises:
        CheckpointError: wrong architecture, missing / unexpected keys or shape mismatches
            (each named).
    """
    from fortify.config.loader import to_dict
    from fortify.config.schema import DefenseConfig, ExperimentConfig, ModelConfig
    from fortify.defenses.fsr import RELEASE_EPS
    from fortify.errors import CheckpointError, ConfigError
    from fortify.factory import build_model

    if arch not in ARCHS:
        raise ConfigError(f"unknown release architecture {arch!r}; choose one of {list(ARCHS)}")
    found = detect_arch(state)
    if found is None:
        raise CheckpointError(
            f"the checkpoint matches none of the release layouts {list(ARCHS)} (no key "
            f"{SIGNATURES[arch]!r}); first keys: {_listing(sorted(state), 6)}"
        )
    if found != arch:
        raise CheckpointError(
            f"--arch {arch} was given but the checkpoint has the {found} layout (key "
            f"{SIGNATURES[found]!r}); pass --arch {found}"
        )
    s = infer_settings(state, arch)
    if num_classes is not None and num_classes != s["num_classes"]:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match the checkpoint's classifier "
            f"({HEADS[arch]} has {s['num_classes']} outputs)"
        )
    position = POSITIONS[arch]
    defences = []
    if s["has_fsr"]:
        options = {"tau": tau, "hidden": s["hidden"], "eps_log": RELEASE_EPS}
        defences.append(DefenseConfig(kind="fsr", at=[position], options=options))
    else:
        log.warning("no FSR keys in the checkpoint: importing the %s backbone only", arch)
    cfg = ExperimentConfig(
        name=f"fsr-release-{arch}",
        model=ModelConfig(name=s["model_name"], kwargs=s["model_kwargs"]),
        defenses=defences,
    )
    cfg.data.name = dataset
    image_shape = (s["in_channels"], image_size, image_size)
    model = build_model(cfg.model, cfg.defenses, s["num_classes"], image_shape)
    mapped = map_keys(state, position)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in expected]
    if missing:
        raise CheckpointError(
            f"the {arch} checkpoint is missing {len(missing)} key(s) fortify needs: "
            f"{_listing(missing)}"
        )
    if unexpected:
        raise CheckpointError(
            f"the {arch} checkpoint has {len(unexpected)} unexpected key(s): {_listing(unexpected)}"
        )
    bad = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(
            f"{len(bad)} tensor(s) of the {arch} checkpoint have the wrong shape "
            f"(checkpoint vs model): {_listing(bad, 6)}"
        )
    for k, v in expected.items():  # old checkpoints may lack BN's num_batches_tracked
        mapped.setdefault(k, v)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    cfg_dict = to_dict(cfg)
    cfg_dict["data"]["name"] = dataset
    return model, cfg_dict, image_shape


def import_fsr_release(
    path: str | Path,
    arch: str,
    out: str | Path,
    *,
    num_classes: int | None = None,
    dataset: str = "cifar10",
    image_size: int = 32,
    tau: float = 0.1,
    overwrite: bool = False,
) -> Path:
    """Import the release checkpoint at ``path`` into a fortify run directory ``out``.

    ``out`` gets ``config.yaml``, ``status.json`` (finished) and ``checkpoints/final.safetensors``
    (+ JSON sidecar), so ``fortify eval OUT`` and :func:`fortify.runs.load_model` work on it.
    ``overwrite`` moves an existing folder aside (never deletes).

    Returns:
        the path of the written weights file.
    """
    import torch

    from fortify.errors import CheckpointError, ConfigError
    from fortify.runs import RunDir

    check_import_args(dataset, image_size=image_size, num_classes=num_classes, tau=tau)
    RunDir.check_can_open(out, "overwrite" if overwrite else "new")
    state = read_state_dict(path)
    model, cfg, shape = build_release_model(
        state, arch, num_classes=num_classes, dataset=dataset, image_size=image_size, tau=tau
    )
    image_shape = [int(v) for v in shape]
    try:
        with torch.no_grad():
            logits = model(torch.full((2, *image_shape), 0.5))
    except RuntimeError as exc:
        raise ConfigError(
            f"--image-size {image_size} does not suit the {arch} model "
            f"({str(exc).splitlines()[0][:200]}); use the size it was trained on (e.g. 32)"
        ) from exc
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"the imported {arch} model produces non-finite logits")
    with RunDir.open(out, mode="overwrite" if overwrite else "new", config=cfg) as run:
        target = _write(run, model, cfg, logits, image_shape, path, arch)
    log.info("imported %s (%s) -> %s", path, arch, target)
    return target


def check_import_args(
    dataset: str,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    tau: float | None = None,
) -> None:
    """Refuse bad importer options (``ConfigError`` naming the value) before any work."""
    import math

    from fortify.data import available
    from fortify.errors import ConfigError, unknown_name

    if dataset not in available():
        raise unknown_name("dataset", dataset, available())
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"--image-size must be an integer >= 1 (pixels), got {image_size!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ConfigError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau (Gumbel-softmax temperature) must be > 0, got {tau!r}")


def _write(
    run: Any,
    model: Any,
    cfg: dict[str, Any],
    logits: Any,
    image_shape: list[int],
    path: str | Path,
    arch: str,
) -> Path:
    from fortify.runs import save_checkpoint

    target = run.checkpoint_path("final")
    meta = {
        "config": cfg,
        "num_classes": int(logits.shape[1]),
        "image_shape": image_shape,
        "tag": "final",
        "source": {"kind": NAME, "path": str(Path(path).resolve()), "arch": arch},
    }
    save_checkpoint(target, model, meta)
    run.set_state("finished", source=NAME, arch=arch)
    return target
