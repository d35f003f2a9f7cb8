"""Feature analysis of FSR blocks (the paper's "robustness of recalibrated feature" table).

For one FSR block and each feature variant

=========  ==========================  ==============================
variant    tensor                      meaning
=========  ==========================  ==============================
``f+``     ``m ⊙ f``                   robust feature
``f-``     ``(1 − m) ⊙ f``             non-robust feature
``f~-``    ``f− + (1 − m) ⊙ R(f−)``    recalibrated non-robust feature
``f~-+f+`` ``f+ + f̃−``                the block's output (FSR)
=========  ==========================  ==============================

:func:`feature_analysis` measures

- **classification accuracy** of the network whose FSR output is *replaced* by the variant,
  on clean test images and under white-box L∞ attacks crafted against that same network (the
  variant network, eval mode, so the mask is deterministic). ``attack="paper"`` (default) runs
  the slides' attacks: **Ensemble** (per-point worst case of FGSM, PGD-20, PGD-100 and C&W,
  the ``paper`` suite) and **AutoAttack** (standard), both through
  :func:`fortify.evaluate.evaluate`; ``"ensemble"`` / ``"autoattack"`` run one of them;
  ``"pgd"`` is the cheap option: PGD-``steps`` with random start, step max(ε/4, 2.5ε/steps);
- **weighted k-NN accuracy** (k = 5, 20 by default) of ``GAP(variant)``: queries are the
  adversarial test images (PGD against the full FSR model), the memory is ``GAP(variant)`` of
  *clean training images* (the split the model was fitted on). Similarity is cosine; a
  neighbour's vote is ``exp(sim / 0.07)`` (Wu et al., 2018).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.fsr import FSRBlock, fsr_blocks
from fortify.errors import FortifyError

log = logging.getLogger(__name__)

VARIANTS = {"f+": "f_pos", "f-": "f_neg", "f~-": "f_neg_rec", "f~-+f+": "out"}

__all__ = [
    "ATTACKS",
    "VARIANTS",
    "FeatureReport",
    "block_features",
    "check_feature_analysis",
    "feature_analysis",
    "pgd_batches",
    "pick_block",
    "use_part",
    "weighted_knn",
]


def pick_block(model: nn.Module, name: str | None = None) -> tuple[str, FSRBlock]:
    """The FSR block attached after ``name`` (default: the only / deepest one)."""
    blocks = fsr_blocks(model)
    if not blocks:
        raise FortifyError("the model has no FSR block; attach one with fortify.defenses.fsr")
    if name is None:
        name = list(blocks)[-1]
    if name not in blocks:
        raise FortifyError(f"no FSR block after {name!r}; FSR blocks sit after: {list(blocks)}")
    return name, blocks[name]


@contextlib.contextmanager
def use_part(block: FSRBlock, part: str) -> Iterator[None]:
    """Within the block, the FSR block outputs ``part`` (an :class:`FSRParts` field) instead."""
    old = block.output_part
    block.output_part = part
    try:
        yield
    finally:
        block.output_part = old


@torch.no_grad()
def block_features(
    model: nn.Module, block: FSRBlock, x: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """GAP of every variant at ``block`` for images ``x`` (N, C, H, W); eval mode.

    Returns:
        variant name -> (N, C_block) float32 features (CPU). Missing variants (ablations) are
        left out.
    """
    was = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in VARIANTS}
    try:
        device = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            captured.clear()
            model(x[i : i + batch_size].to(device))
            parts = block.parts(captured[0])
            for name, attr in VARIANTS.items():
                t = getattr(parts, attr)
                if t is not None:
                    out[name].append(t.float().mean(dim=(2, 3)).cpu())
    finally:
        handle.remove()
        model.train(was)
    return {k: torch.cat(v) for k, v in out.items() if v}


def weighted_knn(
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN predictions: cosine similarity, votes ``exp(sim / temperature)``.

    Args:
        memory: (M, D) features; memory_labels: (M,) int64; queries: (Q, D).
    Returns:
        (Q,) predicted labels.
    """
    if k < 1 or k > len(memory):
        raise FortifyError(f"k must be in [1, {len(memory)}] (memory size), got {k}")
    mem = F.normalize(memory.float(), dim=1)
    preds = []
    for i in range(0, len(queries), chunk):
        q = F.normalize(queries[i : i + chunk].float(), dim=1)
        sim, idx = (q @ mem.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, memory_labels[idx], torch.exp(sim / temperature))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


ATTACKS = {
    "paper": "Ensemble (FGSM, PGD-20, PGD-100, C&W κ=50) and AutoAttack (standard)",
    "ensemble": "Ensemble (FGSM, PGD-20, PGD-100, C&W κ=50)",
    "autoattack": "AutoAttack (standard)",
    "pgd": "PGD (random start)",
}
_SUITE_COLUMNS = {
    "paper": ("full", ("Ensemble", "AutoAttack")),
    "ensemble": ("paper", ("Ensemble",)),
    "autoattack": ("autoattack", ("AutoAttack",)),
}


@dataclass
class FeatureReport:
    """Accuracies (%) per variant; see the module docstring for the protocol.

    ``attack`` names the classification attacks that ran, ``columns`` their column names;
    ``adv_acc[variant][column]`` is the accuracy under that column's attack.
    """

    block: str
    eps: float
    attack: str
    n_test: int
    n_memory: int
    ks: list[int]
    columns: list[str] = field(default_factory=list)
    knn_attack: str = ""
    clean_acc: dict[str, float] = field(default_factory=dict)
    adv_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    knn_acc: dict[str, dict[int, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (k-NN keys as strings)."""
        d = asdict(self)
        d["knn_acc"] = {v: {str(k): a for k, a in accs.items()} for v, accs in self.knn_acc.items()}
        return d

    def table(self) -> str:
        """Markdown table: variant, clean acc, one column per attack, k-NN accuracies."""
        head = (
            "| feature | clean | "
            + " | ".join(self.columns)
            + " | "
            + " | ".join(f"{k}-NN" for k in self.ks)
            + " |"
        )
        rows = [head, "|" + "---|" * (2 + len(self.columns) + len(self.ks))]
        for v in self.adv_acc:
            adv = " | ".join(f"{self.adv_acc[v][c]:.2f}" for c in self.columns)
            knn = " | ".join(f"{self.knn_acc[v][k]:.2f}" for k in self.ks)
            rows.append(f"| {v} | {self.clean_acc[v]:.2f} | {adv} | {knn} |")
        notes = (
            f"\n\nFSR block after `{self.block}`, L∞ ε = {self.eps:g}, {self.n_test} test images. "
            f"Classification: the network with the block output replaced by the feature, attacked "
            f"white-box as that network with {self.attack}. k-NN: GAP features of adversarial "
            f"test images ({self.knn_attack} against the full model) against a memory of "
            f"{self.n_memory} clean training images, cosine similarity, weights exp(sim/0.07)."
        )
        return "\n".join(rows) + notes


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    return 100.0 * correct / max(1, len(x))


def pgd_batches(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """L∞ PGD (random start, step max(ε/4, 2.5ε/steps)) in batches; returns x_adv on CPU."""
    from fortify.attacks import pgd

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(
            pgd(
                model,
                x[i : i + batch_size].to(device),
                y[i : i + batch_size].to(device),
                eps=eps,
                steps=steps,
                step_size=max(eps / 4, 2.5 * eps / steps),
                random_start=True,
                generator=gen,
            ).cpu()
        )
    return torch.cat(outs)


def _attacked_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    eps: float,
    steps: int,
    batch_size: int,
    seed: int,
    x_adv: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy (%) under ``attack`` of ``model`` as it is now (variant already selected)."""
    if attack == "pgd":
        if x_adv is None:
            x_adv = pgd_batches(model, x, y, eps, steps, batch_size, seed)
        return {f"PGD-{steps}": _accuracy(model, x_adv, y, batch_size)}
    from fortify.evaluate import evaluate

    suite, columns = _SUITE_COLUMNS[attack]
    device = next(model.parameters()).device
    report = evaluate(
        model, x, y, suite=suite, eps=eps, batch_size=batch_size, seed=seed, checks=False,
        device=device, progress=False,
    )  # fmt: skip
    row = report.table()["final"]
    return {c: row[c] for c in columns}


def check_feature_analysis(
    model: nn.Module, *, num_classes: int, attack: str = "paper", block: str | None = None
) -> tuple[str, FSRBlock]:
    """The input checks of :func:`feature_analysis`, without any work: the FSR block it would
    analyse (see :func:`pick_block`), or :class:`FortifyError` for an unknown ``attack``, no
    such FSR block, or AutoAttack on fewer than 4 classes."""
    if attack not in ATTACKS:
        raise FortifyError(
            f"unknown feature-analysis attack {attack!r}; allowed: {', '.join(ATTACKS)}"
        )
    if attack in ("paper", "autoattack") and num_classes < 4:
        raise FortifyError(
            f"attack {attack!r} includes AutoAttack, whose standard version needs >= 4 classes "
            f"(the model has {num_classes}); use attack='ensemble' or 'pgd'"
        )
    return pick_block(model, block)


def feature_analysis(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    x_memory: torch.Tensor,
    y_memory: torch.Tensor,
    *,
    num_classes: int,
    eps: float,
    attack: str = "paper",
    steps: int = 20,
    ks: tuple[int, ...] = (5, 20),
    block: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> FeatureReport:
    """Classification and weighted k-NN accuracy of f+, f−, f̃−, f̃− + f+ (see module docstring).

    Args:
        x_test, y_test: (N, C, H, W) images in [0, 1] and (N,) labels (e.g. the test split).
        x_memory, y_memory: clean training images and labels forming the k-NN memory.
        eps: L∞ radius in pixel units.
        attack: classification attacks, one of :data:`ATTACKS` (default ``"paper"``: Ensemble
            and AutoAttack as the FSR slides; AutoAttack needs >= 4 classes).
        steps: PGD steps of the k-NN queries (random start, against the full model) and of the
            classification attack when ``attack="pgd"``.
    Raises:
        FortifyError: unknown ``attack``; no FSR block; AutoAttack on fewer than 4 classes.
    """
    name, blk = check_feature_analysis(model, num_classes=num_classes, attack=attack, block=block)
    was = model.training
    model.eval()
    columns = [f"PGD-{steps}"] if attack == "pgd" else list(_SUITE_COLUMNS[attack][1])
    description = f"PGD-{steps} (random start)" if attack == "pgd" else ATTACKS[attack]
    report = FeatureReport(
        block=name,
        eps=eps,
        attack=description,
        n_test=len(x_test),
        n_memory=len(x_memory),
        ks=list(ks),
        columns=columns,
        knn_attack=f"PGD-{steps} (random start)",
    )
    log.info("feature analysis: classification under %s", description)
    try:
        x_adv_full = pgd_batches(model, x_test, y_test, eps, steps, batch_size, seed)
        memory = block_features(model, blk, x_memory, batch_size)
        queries = block_features(model, blk, x_adv_full, batch_size)
        for variant, attr in VARIANTS.items():
            if variant not in memory:
                continue
            with use_part(blk, attr):
                report.clean_acc[variant] = _accuracy(model, x_test, y_test, batch_size)
                report.adv_acc[variant] = _attacked_accuracy(
                    model, x_test, y_test, attack=attack, eps=eps, steps=steps,
                    batch_size=batch_size, seed=seed,
                    x_adv=x_adv_full if attr == "out" else None,
                )  # fmt: skip
            report.knn_acc[variant] = {}
            for k in ks:
                pred = weighted_knn(memory[variant], y_memory, queries[variant], k, num_classes)
                report.knn_acc[variant][k] = 100.0 * float((pred == y_test).float().mean())
            log.info(
                "%s: clean %.2f, %s, kNN %s",
                variant,
                report.clean_acc[variant],
                report.adv_acc[variant],
                ", ".join(f"k={k} {v:.2f}" for k, v in report.knn_acc[variant].items()),
            )
    finally:
        model.train(was)
    return report
