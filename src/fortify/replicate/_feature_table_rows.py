"""The rows of a feature table (:mod:`fortify.replicate._feature_table`): :class:`Row` (label,
defences, the paper's number, training changes) and the ExperimentConfig of one (row, seed) —
fsr-table1's AT recipe plus the row's defences at CPU-scale sizes."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from typing import Any

from fortify.replicate import _fsr_recipe as recipe


@dataclass(frozen=True)
class Row:
    """One table row: a label, the defences (config dicts), what the paper reports for it and
    ``train`` settings that replace the recipe's (e.g. ``{"precision": "fp32"}``)."""

    label: str
    defences: list[dict[str, Any]] = field(default_factory=list)
    paper: str = ""
    train: dict[str, Any] = field(default_factory=dict)


def _expand(defences: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fill the CPU-scale sizes (FSR hidden, CIFS probe width) into a row's defences."""
    out = []
    for d in copy.deepcopy(defences):
        opts = d.setdefault("options", {})
        if d["kind"] == "fsr":
            opts.setdefault("hidden", args.fsr_hidden)
        if d["kind"] == "cifs":
            opts.setdefault("hidden", args.cifs_hidden)
        if d["kind"] == "fd" and args.fd_at:
            d["at"] = [p.strip() for p in args.fd_at.split(",") if p.strip()]
        out.append(d)
    return out


def row_config(row: str, spec: Row, seed: int, args: argparse.Namespace) -> Any:
    """The ExperimentConfig of one (row, seed): fsr-table1's AT recipe plus the row's defences."""
    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig

    data = to_dict(recipe.row_config("at", args, seed=seed))
    data["name"] = f"fsr-feature-{row}-seed{seed}"
    data["defenses"] = _expand(spec.defences, args)
    data["train"].update(copy.deepcopy(spec.train))
    return from_dict(ExperimentConfig, data)
