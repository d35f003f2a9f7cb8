"""Out-of-distribution (common corruption) accuracy: published sets or generated corruptions.

Published sets:

* **CIFAR-10-C / CIFAR-100-C** (Hendrycks & Dietterich 2019): a folder with one
  ``<corruption>.npy`` per corruption holding 50,000 uint8 HWC images = 5 severities × 10,000
  test images, severity-major (rows 0–9,999 are severity 1), and ``labels.npy`` (50,000 labels).
* **Tiny-ImageNet-C**: ``<corruption>/<severity>/<wnid>/*.JPEG`` image folders.

For datasets without a published set (Fashion-MNIST, MNIST, digits, SVHN, your own) the test
images are corrupted on the fly with :mod:`fortify.evaluate.corruptions` (seeded).

:func:`evaluate_ood` reports accuracy (percent) per corruption × severity, per corruption, per
severity and the mean over all; the ``ood`` evaluation suite wraps it, with the fields of
:class:`OODOptions` as its ``suite_options`` (e.g. ``{"dataset": "cifar10"}`` to find CIFAR-10-C).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fortify.errors import ConfigError, DataError, check_point_count
from fortify.evaluate import corruptions as C
from fortify.evaluate.context import SuiteContext
from fortify.evaluate.ood_readers import (
    BENCHMARK_CORRUPTIONS,
    SEVERITIES,
    list_cifar_c,
    read_cifar_c,
    read_tiny_imagenet_c,
)
from fortify.evaluate.registry import register_suite

log = logging.getLogger(__name__)

PUBLISHED = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "tiny-imagenet": "Tiny-ImageNet-C"}
SOURCES = ("auto", "published", "generated")


@dataclass
class OODResult:
    """Accuracy (percent) under corruptions.

    Attributes:
        table: {corruption: {severity: accuracy}}.
        source: "generated (seed S)" or the published set's folder.
        n_points: images per corruption and severity.
        clean: accuracy on the uncorrupted images (generated sets only; else None).
    """

    table: dict[str, dict[int, float]]
    source: str
    n_points: int
    clean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_corruption(self) -> dict[str, float]:
        return {c: float(np.mean(list(v.values()))) for c, v in self.table.items()}

    @property
    def per_severity(self) -> dict[int, float]:
        sev = sorted({s for v in self.table.values() for s in v})
        return {s: float(np.mean([v[s] for v in self.table.values() if s in v])) for s in sev}

    @property
    def mean(self) -> float:
        """Mean accuracy over every corruption and severity (the paper's OOD number)."""
        return float(np.mean(list(self.per_corruption.values()))) if self.table else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["table"] = {c: {str(s): a for s, a in v.items()} for c, v in self.table.items()}
        d["per_corruption"] = self.per_corruption
        d["per_severity"] = {str(s): a for s, a in self.per_severity.items()}
        d["mean"] = self.mean
        return d

    def markdown(self) -> str:
        sev = list(self.per_severity)
        lines = [
            f"OOD accuracy (%) — {self.source}, {self.n_points} images per cell; "
            f"mean {self.mean:.2f}"
            + (f", clean {self.clean:.2f}" if self.clean is not None else ""),
            "",
            "| corruption | " + " | ".join(f"s{s}" for s in sev) + " | mean |",
            "|---|" + "---:|" * (len(sev) + 1),
        ]
        for c, v in self.table.items():
            cells = " | ".join(f"{v[s]:.2f}" if s in v else "–" for s in sev)
            lines.append(f"| {c} | {cells} | {self.per_corruption[c]:.2f} |")
        cells = " | ".join(f"{a:.2f}" for a in self.per_severity.values())
        lines.append(f"| **mean** | {cells} | **{self.mean:.2f}** |")
        return "\n".join(lines)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / max(len(x), 1)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _log_header(label: str, severities: Sequence[int], n: int | None) -> None:
    log.info(
        "OOD accuracy (%%) of %s, %s images per cell; one line per corruption, columns %s",
        label,
        n if n is not None else "all",
        " ".join(f"s{s}" for s in severities),
    )


def _log_row(label: str, name: str, row: dict[int, float]) -> None:
    cells = "  ".join(f"s{s} {a:5.1f}" for s, a in row.items())
    log.info("OOD %s | %-18s | %s", label, name, cells)


def generated_ood(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    label: str | None = None,
) -> OODResult:
    """Accuracy of ``model`` (eval mode) on generated corruptions of (x, y).

    Args:
        x: float test images (N, C, H, W) in [0, 1]; y: int64 labels (N,).
        corruptions: names from :func:`fortify.evaluate.corruptions.available` (default: all
            that fit the channel count).
        seed: every (corruption, severity) cell uses generators seeded from ``seed`` and the
            batch index, so results are reproducible and severities share their noise draws.
        label: the model's name in the log lines (default: its class name).
    """
    names = list(corruptions) if corruptions is not None else C.available(x.shape[1])
    for name in names:  # fail before any work, e.g. on "frost", which is not generated
        C.check_name(name)
    for s in severities:
        if s not in SEVERITIES:
            raise ConfigError(f"severity must be one of {list(SEVERITIES)}, got {s!r}")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    table: dict[str, dict[int, float]] = {}
    try:
        x, y = x.to(device), y.to(device)
        clean = _accuracy(model, x, y, batch_size)
        label = label or type(model).__name__
        _log_header(label, severities, len(x))
        for name in names:
            if progress is not None:
                progress(name)
            row = {}
            for s in severities:
                correct = 0
                for b, i in enumerate(range(0, len(x), batch_size)):
                    xb = C.corrupt(x[i : i + batch_size], name, s, seed=seed * 100_003 + b)
                    with torch.no_grad():
                        correct += int((model(xb).argmax(1) == y[i : i + batch_size]).sum())
                row[s] = 100.0 * correct / max(len(x), 1)
            table[name] = row
            _log_row(label, name, row)
    finally:
        model.train(was_training)
    return OODResult(table, f"generated corruptions (seed {seed})", len(x), clean)


def published_ood(
    model: nn.Module,
    root: str | os.PathLike[str],
    *,
    kind: str = "cifar-c",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    n_points: int | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    label: str | None = None,
) -> OODResult:
    """Accuracy of ``model`` on a published corrupted set at ``root``.

    Args:
        kind: ``"cifar-c"`` (CIFAR-10-C / CIFAR-100-C .npy files) or ``"tiny-imagenet-c"``.
        n_points: first images per severity (all when None).
        classes: Tiny-ImageNet class ids (wnids) in the model's label order.
        label: the model's name in the log lines (default: its class name).
    """
    label = label or type(model).__name__
    _log_header(label, severities, n_points)
    if kind == "cifar-c":
        names = (
            list(corruptions)
            if corruptions is not None
            else [n for n in list_cifar_c(root) if n in BENCHMARK_CORRUPTIONS] or list_cifar_c(root)
        )
    elif kind == "tiny-imagenet-c":
        if classes is None:
            raise ConfigError("Tiny-ImageNet-C needs the model's class ids (wnids) in label order")
        d = Path(root)
        names = (
            list(corruptions)
            if corruptions is not None
            else sorted(p.name for p in d.iterdir() if p.is_dir())
        )
    else:
        raise ConfigError(f"unknown corrupted-set kind {kind!r}; allowed: cifar-c, tiny-imagenet-c")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    table: dict[str, dict[int, float]] = {}
    count = 0
    try:
        for name in names:
            if progress is not None:
                progress(name)
            if kind == "cifar-c":
                sets = read_cifar_c(root, name, severities=severities, limit=n_points)
            else:
                sets = {
                    s: read_tiny_imagenet_c(root, name, s, classes, limit=n_points)  # type: ignore[arg-type]
                    for s in severities
                }
            row = {}
            for s, iset in sets.items():
                x, y = iset.floats(device)
                row[s] = _accuracy(model, x, y, batch_size)
                count = len(iset)
            table[name] = row
            _log_row(label, name, row)
    finally:
        model.train(was_training)
    return OODResult(table, str(root), count)


def find_published(dataset: str | None, root: str | os.PathLike[str] | None = None) -> Path | None:
    """Folder of the published corrupted set for ``dataset`` (``<root or $FORTIFY_DATA or ./data>/
    CIFAR-10-C`` …), or None when the dataset has none or it is not on disk."""
    if dataset not in PUBLISHED:
        return None
    folder = PUBLISHED[dataset]
    cands = []
    if root is not None:
        cands += [Path(root) / folder, Path(root)]
    if os.environ.get("FORTIFY_DATA"):
        cands.append(Path(os.environ["FORTIFY_DATA"]) / folder)
    cands.append(Path("data") / folder)
    for cand in cands:
        if (cand / "labels.npy").is_file() or (cand / "gaussian_noise").is_dir():
            return cand
    return None


def evaluate_ood(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dataset: str | None = None,
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    source: str = "auto",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 256,
    n_points: int | None = None,
    label: str | None = None,
) -> OODResult:
    """OOD accuracy: the published set for CIFAR-10/100 and Tiny-ImageNet when found on disk
    (``source="auto"`` or ``"published"``), otherwise generated corruptions of (x, y).

    x: float test images (N, C, H, W) in [0, 1] (used for generated corruptions and to size the
    published subset: the first ``n_points or len(x)`` images per severity).
    """
    _check_source(source)
    found = find_published(dataset, root) if source != "generated" else None
    if source == "published" and found is None:
        raise DataError(
            f"no published corrupted set for dataset {dataset!r} found"
            + (
                f" (looked for {PUBLISHED[dataset]} under {root or '$FORTIFY_DATA or ./data'})"
                if dataset in PUBLISHED
                else f"; published sets exist only for {sorted(PUBLISHED)}"
            )
        )
    if found is not None:
        kind = "tiny-imagenet-c" if dataset == "tiny-imagenet" else "cifar-c"
        log.info("OOD: using the published set at %s", found)
        return published_ood(
            model,
            found,
            kind=kind,
            corruptions=corruptions,
            severities=severities,
            n_points=n_points or len(x),
            classes=classes,
            batch_size=batch_size,
            label=label,
        )
    if dataset in PUBLISHED:
        log.warning(
            "OOD: %s not found for %s; falling back to generated corruptions (not comparable "
            "with published numbers)",
            PUBLISHED[dataset],
            dataset,
        )
    if n_points is not None:
        x, y = x[:n_points], y[:n_points]
    return generated_ood(
        model,
        x,
        y,
        corruptions=corruptions,
        severities=severities,
        seed=seed,
        batch_size=batch_size,
        label=label,
    )


# the ``ood`` evaluation suite


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ConfigError(f"OOD source must be one of {', '.join(SOURCES)}, got {source!r}")


@dataclass
class OODOptions:
    """Options of the ``ood`` suite (``evaluate(..., suite="ood", suite_options={...})``).

    Attributes:
        dataset: the dataset the points come from (finds CIFAR-10-C & co.; None: generated).
        root: where to look for the published set (else ``$FORTIFY_DATA`` or ``./data``).
        classes: Tiny-ImageNet class ids (wnids) in the model's label order.
        source: ``auto``, ``published`` or ``generated`` (see :func:`evaluate_ood`).
        corruptions: corruption names (None: the benchmark's / all that fit).
        severities: severities 1–5 to evaluate.
        n_points: images per corruption and severity (None: the evaluated points' count).
        label: the model's name in the log lines (e.g. the run directory; None: class name).
    """

    dataset: str | None = None
    root: str | os.PathLike[str] | None = None
    classes: Sequence[str] | None = None
    source: str = "auto"
    corruptions: Sequence[str] | None = None
    severities: Sequence[int] = SEVERITIES
    n_points: int | None = None
    label: str | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a bad source, severity or point count."""
        _check_source(self.source)
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad:
            raise ConfigError(
                f"OOD severities {bad} are not allowed; choose from {list(SEVERITIES)}"
            )
        check_point_count(self.n_points, "OOD n_points")


@register_suite("ood", options=OODOptions)
def _ood_suite(ctx: SuiteContext) -> None:
    """OOD: accuracy under common corruptions (published CIFAR-C sets or generated), 5 severities"""
    result = evaluate_ood(
        ctx.model, ctx.x, ctx.y, seed=ctx.seed, batch_size=ctx.batch_size, **ctx.options
    )
    ctx.extras["ood"] = result.to_dict()
    ctx.extras["ood_markdown"] = result.markdown()
    ctx.check(
        "OOD",
        "ok",
        f"mean corruption accuracy {result.mean:.2f}% over {len(result.table)} corruptions × "
        f"{len(result.per_severity)} severities ({result.source}); per severity: "
        + ", ".join(f"s{s} {a:.2f}" for s, a in result.per_severity.items())
        + "; per corruption: "
        + ", ".join(f"{c} {a:.2f}" for c, a in result.per_corruption.items()),
    )
