"""MART baseline diagnostics at CPU scale (docs/results/fsr_table1.md, "MART baseline").

Trains one row of the CPU FSR-table recipe (``fortify.replicate.fsr_table1.row_config``:
small-resnet width 4, Fashion-MNIST, PGD-7 step 0.025 at ε 0.1, lr 0.05, bf16) on fewer images,
then reports validation clean and PGD-20 accuracy (step 0.01, no random start) of the last epoch
and the per-epoch training metrics, as one JSON line (also appended to ``--log``).

``--former`` reproduces fortify's MART before the release defaults were adopted: uniform random
start in the ε-ball and the boosted term ``−log(1 − p + 1e-12)``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diagnose_mart.py mart-rel --seed 0
    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diagnose_mart.py mart-former --former
    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diagnose_mart.py at --objective at
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _former_compute(self: Any, model: Any, b: Any, ctx: Any) -> Any:
    """fortify's former MART loss: boosted term −log(1 − max wrong p + 1e-12)."""
    from fortify.train.objectives.base import accuracy, clean_and_adv, kl_clean_adv, with_aux

    logits_clean, logits_adv, terms = clean_and_adv(model, b)
    y = b.y
    p_adv = F.softmax(logits_adv.float(), dim=1)
    ce = F.cross_entropy(logits_adv.float(), y)
    wrong = p_adv.scatter(1, y[:, None], -1.0).amax(1)
    boost = -torch.log(1.0 - wrong + 1e-12).mean()
    p_true = F.softmax(logits_clean.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    kl = (kl_clean_adv(logits_clean, logits_adv) * (1.0 - p_true)).mean()
    metrics = {
        "ce_adv": ce.detach(),
        "boost": boost.detach(),
        "kl_weighted": kl.detach(),
        "acc": accuracy(logits_clean, y),
        "acc_adv": accuracy(logits_adv, y),
    }
    return with_aux(ce + boost + self.cfg.beta * kl, terms, metrics)


def main() -> None:
    from fortify.attacks import pgd
    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig
    from fortify.data import load_from_config
    from fortify.replicate.fsr_table1 import row_config
    from fortify.runs import load_model
    from fortify.train import fit
    from fortify.train.objectives import mart

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--objective", default="mart", choices=["mart", "at", "trades"])
    ap.add_argument("--former", action="store_true", help="fortify's former MART (see above)")
    ap.add_argument("--start", default=None, choices=["gaussian", "uniform"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=5000, help="training images")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--beta", type=float, default=6.0)
    ap.add_argument("--out", default="runs/mart-diagnostics")
    ap.add_argument("--log", default="runs/mart-diagnostics/results.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.former:
        mart.Mart.compute = _former_compute  # type: ignore[method-assign]
    ns = argparse.Namespace(
        seed=a.seed, train_subset=a.subset, width=4, fsr_hidden=8, epochs=a.epochs,
        batch_size=128, attack_steps=7, test_points=1000,
    )  # fmt: skip
    cfg = to_dict(row_config(a.objective, ns, seed=a.seed))
    cfg["train"]["beta"] = a.beta
    start = a.start or ("uniform" if a.former else "gaussian")
    if a.objective == "mart":
        cfg["train"]["options"] = {"mart_start": start}
    exp = from_dict(ExperimentConfig, cfg)
    run = Path(a.out) / a.name
    t0 = time.process_time()
    res = fit(exp, run, mode="overwrite", progress=False)
    model, _ = load_model(run, tag="last")
    model.eval()
    x, y = load_from_config(exp.data).val.head(1000).floats()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    xa = torch.cat(
        [
            pgd(model, x[i : i + 500], y[i : i + 500], eps=0.1, steps=20, step_size=0.01,
                random_start=False)
            for i in range(0, len(x), 500)
        ]
    )  # fmt: skip
    with torch.no_grad():
        robust = (model(xa).argmax(1) == y).float().mean().item()
    keep = ("epoch", "train/acc", "train/ce", "train/boost", "train/kl", "val/")
    out = {
        "name": a.name,
        "args": vars(a),
        "start": start if a.objective == "mart" else None,
        "val_clean": round(100 * clean, 2),
        "val_pgd20": round(100 * robust, 2),
        "cpu_s": round(time.process_time() - t0, 1),
        "history": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
             if k.startswith(keep)}
            for r in res.history
        ],
    }  # fmt: skip
    print(json.dumps(out))
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
