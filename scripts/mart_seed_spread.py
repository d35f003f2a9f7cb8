"""Seed-to-seed spread of MART and AT at the FSR Table 1 CPU recipe, on the validation split.

Evaluates the ``last`` checkpoint of each given run on the first ``--points`` validation images
(never the test points the table uses): clean and PGD-20 (L∞ ε 0.1, step 0.01, no random start,
fp32, eval mode), keeps per-point outcomes, and prints

* one line per label: the seeds, mean ± sd over seeds of clean and PGD-20 accuracy (%);
* one line per ``--pair B/A``: B − A in percentage points with a 95 % CI from
  :func:`fortify.stats.seed_point_bootstrap` (seeds paired by number, then points) and the
  verdict read from the CI.

Results are cached in ``--json`` by (label, seed, checkpoint SHA-256): rerunning with the same
runs reuses them, and a run folder that no longer exists is read from the JSON alone, so the
summary re-aggregates on a fresh clone. Example (docs/results/fsr_table1_mart.md)::

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/mart_seed_spread.py \
        --run mart-bf16:0=runs/fsr-table1/mart/seed-0 --run at-bf16:0=runs/fsr-table1/at/seed-0 \
        --pair mart-bf16/at-bf16 --json docs/results/mart_seed_spread.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS = {"split": "val", "eps": 0.1, "norm": "linf", "steps": 20, "step_size": 0.01}
COLUMNS = ("clean", "pgd20")


def _parse_run(text: str) -> tuple[str, int, Path]:
    try:
        key, path = text.split("=", 1)
        label, seed = key.rsplit(":", 1)
        return label, int(seed), Path(path)
    except ValueError:
        raise SystemExit(
            f"--run {text!r}: expected LABEL:SEED=RUN_DIR, e.g. mart:0=runs/x"
        ) from None


def _evaluate(run: Path, points: int) -> dict[str, Any]:
    from fortify.attacks import pgd
    from fortify.data import load_from_config
    from fortify.evaluate.outcome import pack_bits
    from fortify.runs import load_model

    model, meta = load_model(run, tag="last")
    x, y = load_from_config(meta["config"]["data"]).val.head(points).floats()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    robust = []
    for i in range(0, len(x), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        xa = pgd(model, xb, yb, eps=SETTINGS["eps"], steps=SETTINGS["steps"],
                 step_size=SETTINGS["step_size"], random_start=False)  # fmt: skip
        with torch.no_grad():
            robust.append(model(xa).argmax(1) == yb)
    return {
        "data": meta["config"]["data"],
        "n": len(y),
        "clean": pack_bits(clean),
        "pgd20": pack_bits(torch.cat(robust)),
    }


def _outcomes(entry: dict[str, Any], column: str) -> np.ndarray:
    from fortify.evaluate.outcome import unpack_bits

    return unpack_bits(entry[column], entry["n"]).numpy().astype(np.int8)


def main(argv: list[str] | None = None) -> int:
    from fortify.runs import RunDir
    from fortify.runs.checkpoint import file_sha256, resolve_checkpoint
    from fortify.stats import mean_sd, seed_point_bootstrap, verdict

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="LABEL:SEED=RUN_DIR")
    ap.add_argument("--pair", action="append", default=[], metavar="B/A")
    ap.add_argument("--points", type=int, default=1000, help="first N validation images")
    ap.add_argument("--json", type=Path, required=True, help="cache and record of the outcomes")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    settings = {**SETTINGS, "points": a.points}
    record: dict[str, Any] = {"settings": settings, "runs": {}}
    if a.json.exists():
        old = json.loads(a.json.read_text())
        if old.get("settings") == settings:
            record = old
    for text in a.run:
        label, seed, run = _parse_run(text)
        key = f"{label}:{seed}"
        cached = record["runs"].get(key)
        if not run.exists():
            if cached is None:
                raise SystemExit(f"{run} does not exist and {a.json} has no result for {key}")
            continue
        state = RunDir(run).state
        if state != "finished":
            raise SystemExit(f"{run} has not finished training (state {state!r})")
        sha = file_sha256(resolve_checkpoint(run, tag="last"))
        if cached is None or cached["checkpoint_sha256"] != sha:
            print(f"evaluating {key} ({run})", file=sys.stderr)
            entry = {"run": str(run), "checkpoint_sha256": sha, **_evaluate(run, a.points)}
            record["runs"][key] = entry
    datas = {json.dumps(e["data"], sort_keys=True) for e in record["runs"].values()}
    if len(datas) > 1:
        raise SystemExit("the runs use different data settings, so different validation points")
    a.json.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    labels: dict[str, dict[int, dict[str, Any]]] = {}
    for key, entry in sorted(record["runs"].items()):
        label, seed = key.rsplit(":", 1)
        labels.setdefault(label, {})[int(seed)] = entry
    print(f"validation points: first {a.points}; PGD-20 step 0.01, eps 0.1, no random start\n")
    print("| run | seeds | clean | PGD-20 |\n|---|---|---:|---:|")
    for label, seeds in labels.items():
        cells = [
            mean_sd([100 * float(_outcomes(e, c).mean()) for e in seeds.values()]).format(2)
            for c in COLUMNS
        ]
        print(f"| {label} | {','.join(map(str, sorted(seeds)))} | {cells[0]} | {cells[1]} |")
    if a.pair:
        print("\n| B − A | seeds | clean [95 % CI] | verdict | PGD-20 [95 % CI] | verdict |")
        print("|---|---|---|---|---|---|")
    for pair in a.pair:
        b, _, base = pair.partition("/")
        if b not in labels or base not in labels:
            raise SystemExit(f"--pair {pair!r}: labels are {sorted(labels)}")
        common = sorted(set(labels[b]) & set(labels[base]))
        cells = []
        for c in COLUMNS:
            ci = seed_point_bootstrap(
                [_outcomes(labels[base][s], c) for s in common],
                [_outcomes(labels[b][s], c) for s in common],
                resamples=2000,
            )
            cells += [ci.format(2), verdict(ci)]
        print(f"| {b} − {base} | {','.join(map(str, common))} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
