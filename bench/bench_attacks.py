"""Attack / evaluator overhead benchmark (a script, not a test). Prints ratios measured in one run.

(a) training-style PGD-k (final mode, all points) ÷ k × (forward + input-gradient backward of the
    bare model on the same batch)             — target ≤ 1.05
(b) best-mode PGD-20 on a quickly PGD-trained model ÷ the same floor, with robust accuracy next
    to final mode's                            — target ≤ 0.75
(c) our ``autoattack`` suite (checks off) ÷ calling pyautoattack directly  — target ≤ 1.02

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attacks.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F

import fortify.models
from fortify.attacks import pgd, pgd_attack
from fortify.evaluate import evaluate


def _interleaved(a, b, pairs: int = 5) -> tuple[float, float, float]:
    """Median times of ``a`` and ``b`` run alternately, and the median of the per-pair ratios b/a.

    The machine is shared, so each pair is timed back to back and the ratio taken per pair.
    """
    a()
    b()
    ta, tb, rs = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        rs.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta), statistics.median(tb), statistics.median(rs)


def floor_step(model, x, y) -> None:
    """One forward + backward w.r.t. the input only (what a PGD step must cost at least)."""
    xa = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xa), y, reduction="sum")
    torch.autograd.grad(loss, xa)


def floor_step_full(model, x, y) -> None:
    """One forward + full backward (parameters too) — the training-step reference."""
    xa = x.detach().requires_grad_(True)
    F.cross_entropy(model(xa), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def bench_a(name, model, x, y, k, pairs) -> None:
    model.eval()
    eps = 8 / 255

    def floor():
        for _ in range(k):
            floor_step(model, x, y)

    def floor_full():
        for _ in range(k):
            floor_step_full(model, x, y)

    def attack():
        pgd(model, x, y, eps=eps, steps=k, step_size=eps / 4)

    t_floor, t_pgd, ratio = _interleaved(floor, attack, pairs)
    _, _, ratio_full = _interleaved(floor_full, attack, max(2, pairs // 2))
    print(
        f"(a) {name:22s} batch {len(x)}: PGD-{k} {t_pgd * 1e3:7.0f} ms | "
        f"k×(fwd+input-bwd) {t_floor * 1e3:7.0f} ms → ratio {ratio:.3f} (target ≤ 1.05); "
        f"vs k×(fwd+full bwd) {ratio_full:.3f}"
    )


def pgd_train(model, x, y, eps, seconds) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t0, it = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(x), 128):
            xb, yb = x[i : i + 128], y[i : i + 128]
            model.eval()
            xa = pgd(model, xb, yb, eps=eps, steps=5, step_size=eps / 2)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(xa), yb).backward()
            opt.step()
            it += 1
            if time.perf_counter() - t0 > seconds:
                break
    model.eval()
    print(f"    PGD-AT: {it} steps in {time.perf_counter() - t0:.0f} s")


def bench_b(x_tr, y_tr, x, y, eps, seconds, repeats) -> None:
    torch.manual_seed(0)
    model = fortify.models.create("small-cnn", 10, 1, width=16)
    pgd_train(model, x_tr, y_tr, eps, seconds)
    k = 20
    kw = dict(eps=eps, steps=k, step_size=eps / 10, random_start=False)

    def floor():
        for _ in range(k):
            floor_step(model, x, y)

    t_floor, t_best, r_best = _interleaved(
        floor, lambda: pgd(model, x, y, mode="best", **kw), repeats
    )
    _, t_final, r_final = _interleaved(floor, lambda: pgd(model, x, y, mode="final", **kw), repeats)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item() * 100
    acc_final = (
        100 - pgd_attack(model, x, y, mode="final", **kw).success.float().mean().item() * 100
    )
    best = pgd_attack(model, x, y, mode="best", **kw)
    acc_best = 100 - (best.success | (model(x).argmax(1) != y)).float().mean().item() * 100
    print(
        f"(b) small-cnn PGD-AT (28x28, {len(x)} pts): clean {clean:.1f}%, PGD-20 final "
        f"{acc_final:.1f}% / "
        f"best {acc_best:.1f}%; best {t_best * 1e3:.0f} ms, final {t_final * 1e3:.0f} ms, floor "
        "k×step "
        f"{t_floor * 1e3:.0f} ms → best ratio {r_best:.3f} (target ≤ 0.75), "
        f"final ratio {r_final:.3f}"
    )


def bench_c(x_tr, y_tr, x, y, eps) -> None:
    from pyautoattack import AutoAttack

    torch.manual_seed(0)
    model = fortify.models.create("small-cnn", 10, 1, width=8)
    pgd_train(model, x_tr, y_tr, eps, 10)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)

    def direct():
        aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=0)
        aa.run_standard_evaluation(x, y, batch_size=len(x))

    def ours():
        evaluate(
            model,
            x,
            y,
            suite="autoattack",
            eps=eps,
            checks=False,
            batch_size=len(x),
            progress=False,
        )

    t_direct, t_ours, ratio = _interleaved(direct, ours, 3)
    acc = evaluate(
        model, x, y, suite="autoattack", eps=eps, checks=False, batch_size=len(x)
    ).table()["final"]
    print(
        f"(c) autoattack suite {t_ours:.2f} s vs pyautoattack direct {t_direct:.2f} s → ratio "
        f"{ratio:.3f} (target ≤ 1.02); AutoAttack acc {acc['AutoAttack']:.1f}% "
        f"({len(x)} pts)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller batches / shorter training")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # 28×28 stand-in data: digits upsampled (no download needed)
    import fortify.data

    s = fortify.data.load_dataset("digits")
    xtr, ytr = s.train.floats()
    xte, yte = s.test.floats()
    up = lambda t: F.interpolate(t, size=28, mode="bilinear", align_corners=False).clamp(0, 1)  # noqa: E731
    xtr, xte = up(xtr), up(xte)
    n = 64 if args.quick else 128
    reps = 3 if args.quick else 5
    cnn = fortify.models.create("small-cnn", 10, 1, width=32).eval()
    bench_a("small-cnn w32 (28x28)", cnn, xte[:n], yte[:n], 10, reps)
    rn = fortify.models.create("resnet18", 10, 3, width=16).eval()
    xc = torch.rand(32, 3, 32, 32, generator=g)
    yc = torch.randint(0, 10, (32,), generator=g)
    bench_a("resnet18 w16 (32x32)", rn, xc, yc, 10, reps)
    bench_b(xtr, ytr, xte[: n * 2], yte[: n * 2], 0.1, 30 if args.quick else 60, reps)
    bench_c(xtr, ytr, xte[:32], yte[:32], 0.1)


if __name__ == "__main__":
    main()
