"""fortify models in RobustBench's layout, and back.

RobustBench keeps, per model, a weights file ``models/<dataset>/<threat>/<name>.pt`` (a state
dict its loader reads into a plain ``nn.Module``) and a metadata file
``model_info/<dataset>/<threat>/<name>.json`` (``name``, ``authors``, ``dataset``,
``architecture``, ``eps``, ``clean_acc``, ``autoattack_acc``, ``additional_data``,
``number_forward_passes``, ``venue``, ``link``, ``reported``, ``footnote``).

:func:`export_robustbench` writes a fortify checkpoint in that layout: the model's full state
dict (backbone, ``normalize.*`` and attached defences; the model takes [0, 1] images and returns
logits, as RobustBench expects) and the metadata, plus a ``fortify`` block (config, classes,
image shape, the weights' SHA-256) from which :func:`load_robustbench_export` rebuilds the same
model. Accuracies come from an evaluation report when one is given. Both files are written in
full to temporary files first and only then renamed into place (weights, then metadata; SIGINT
and SIGTERM wait for both), so a failed write (a full disk) leaves an earlier export intact;
the weights are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

THREATS = ("Linf", "L2", "corruptions")
INFO_FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "footnote",
)


def paths(root: str | os.PathLike[str], dataset: str, threat: str, name: str) -> tuple[Path, Path]:
    """(weights file, metadata file) of model ``name`` under ``root``."""
    base = Path(root)
    return (
        base / "models" / dataset / threat / f"{name}.pt",
        base / "model_info" / dataset / threat / f"{name}.json",
    )


def _eps_text(eps: float | None) -> str | None:
    """``8/255`` for multiples of 1/255 (RobustBench's notation), else the number."""
    if eps is None:
        return None
    k = round(eps * 255)
    return f"{k}/255" if k > 0 and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def _accuracies(report: dict[str, Any] | None) -> tuple[str, str]:
    """(clean_acc, autoattack_acc) as RobustBench's two-decimal percent strings, or ''."""
    if not report:
        return "", ""
    table = report.get("table") or {}
    row: dict[str, Any] = table.get("final") or next(iter(table.values()), {})
    clean = row.get("Natural")
    aa = next((v for k, v in row.items() if k.lower().startswith("autoattack")), None)
    return ("" if clean is None else f"{clean:.2f}", "" if aa is None else f"{aa:.2f}")


def export_robustbench(
    checkpoint: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    name: str,
    threat: str = "Linf",
    tag: str = "best",
    report: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the fortify checkpoint (run directory or ``.safetensors``) in RobustBench's layout.

    Args:
        root: folder receiving ``models/…`` and ``model_info/…``.
        name: the model's RobustBench-style name (letters, digits, ``_``, ``-``).
        threat: ``Linf``, ``L2`` or ``corruptions``.
        report: an evaluation report (``eval-*.json`` as a dict) for ``clean_acc`` /
            ``autoattack_acc`` and ``eps``.
        info: more metadata fields (``authors``, ``venue``, ``link``, …).
    Returns:
        (weights path, metadata path).
    """
    from fortify.runs import load_model
    from fortify.utils.atomic import atomic_path, deferred_signals

    if threat not in THREATS:
        raise ConfigError(f"threat model {threat!r} is not one of {list(THREATS)}")
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"model name {name!r} may contain only letters, digits, '_' and '-'")
    unknown = sorted(set(info or {}) - set(INFO_FIELDS))
    if unknown:
        raise ConfigError(f"unknown metadata field(s) {unknown}; allowed: {list(INFO_FIELDS)}")
    model, meta = load_model(checkpoint, tag=tag)
    cfg = meta["config"]
    dataset = cfg["data"]["name"]
    weights, info_path = paths(root, dataset, threat, name)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    clean, aa = _accuracies(report)
    eps = (report or {}).get("settings", {}).get("eps")
    if eps is None:
        eps = cfg.get("eval", {}).get("eps")
    defences = [
        f"{d['kind']}@{','.join(d.get('at') or ['default'])}" for d in cfg.get("defenses", [])
    ]
    record: dict[str, Any] = {
        "link": "",
        "name": cfg.get("name", name),
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": " + ".join([cfg["model"]["name"], *defences]),
        "eps": _eps_text(eps),
        "clean_acc": clean,
        "reported": "",
        "autoattack_acc": aa,
        "footnote": "exported by fortify; the model takes [0, 1] images and returns logits",
        **(info or {}),
        "fortify": {
            "config": cfg,
            "num_classes": meta["num_classes"],
            "image_shape": meta["image_shape"],
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "evaluated_points": (report or {}).get("settings", {}).get("n_points"),
        },
    }
    # both files in full before either replaces an earlier export; weights renamed first
    with deferred_signals(), atomic_path(info_path) as tmp_info:
        tmp_info.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        with atomic_path(weights) as tmp_weights:
            tmp_weights.write_bytes(data)
    log.info("exported %s as %s/%s/%s -> %s", checkpoint, dataset, threat, name, weights)
    return weights, info_path


def load_robustbench_export(
    root: str | os.PathLike[str], *, name: str, dataset: str, threat: str = "Linf"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`export_robustbench`: ``(model.eval(), metadata)``.

    Raises:
        CheckpointError: missing files, metadata without the ``fortify`` block, a weights file
            whose SHA-256 differs from the metadata's, or weights that do not fit.
    """
    from fortify.importers._release import read_release_state_dict
    from fortify.runs import apply_state
    from fortify.runs.checkpoint import file_sha256, rebuild_model

    weights, info_path = paths(root, dataset, threat, name)
    for p in (weights, info_path):
        if not p.is_file():
            raise CheckpointError(f"RobustBench-style model {name!r}: {p} does not exist")
    try:
        record = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{info_path} is not readable JSON: {exc}") from exc
    block = record.get("fortify") if isinstance(record, dict) else None
    if not isinstance(block, dict) or not {"config", "num_classes", "image_shape"} <= set(block):
        raise CheckpointError(
            f"{info_path} has no 'fortify' block (config, num_classes, image_shape), so it was "
            "not exported by fortify; load a RobustBench zoo model with the model source "
            f"robustbench:{dataset}/{threat}/<model> instead"
        )
    if block.get("weights_sha256") and file_sha256(weights) != block["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded in {info_path}")
    model = rebuild_model(block, str(info_path))
    state = read_release_state_dict(weights, "expected the state dict written by fortify")
    apply_state(model, state, strict=True, source=f"RobustBench-style weights {weights.name}")
    return model.eval(), record
