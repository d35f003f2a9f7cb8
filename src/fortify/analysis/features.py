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
  on clean test images and under white-box L∞ PGD crafted against that same network (the
  variant network, eval mode, so the mask is deterministic);
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

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.fsr import FSRBlock, fsr_blocks
from fortify.errors import FortifyError

log = logging.getLogger("fortify.analysis.features")

VARIANTS = {"f+": "f_pos", "f-": "f_neg", "f~-": "f_neg_rec", "f~-+f+": "out"}

__all__ = [
    "VARIANTS",
    "FeatureReport",
    "block_features",
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


@dataclass
class FeatureReport:
    """Accuracies (%) per variant; see the module docstring for the protocol."""

    block: str
    eps: float
    attack: str
    n_test: int
    n_memory: int
    ks: list[int]
    clean_acc: dict[str, float] = field(default_factory=dict)
    adv_acc: dict[str, float] = field(default_factory=dict)
    knn_acc: dict[str, dict[int, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready dict (k-NN keys as strings)."""
        d = asdict(self)
        d["knn_acc"] = {v: {str(k): a for k, a in accs.items()} for v, accs in self.knn_acc.items()}
        return d

    def table(self) -> str:
        """Markdown table: variant, clean acc, adversarial acc, k-NN accuracies."""
        head = (
            "| feature | clean | "
            + self.attack
            + " | "
            + " | ".join(f"{k}-NN" for k in self.ks)
            + " |"
        )
        rows = [head, "|" + "---|" * (3 + len(self.ks))]
        for v in self.adv_acc:
            knn = " | ".join(f"{self.knn_acc[v][k]:.2f}" for k in self.ks)
            rows.append(f"| {v} | {self.clean_acc[v]:.2f} | {self.adv_acc[v]:.2f} | {knn} |")
        notes = (
            f"\n\nFSR block after `{self.block}`, L∞ ε = {self.eps:g}, {self.n_test} test images. "
            f"Classification: the network with the block output replaced by the feature, attacked "
            f"white-box ({self.attack}) as that network. k-NN: GAP features of adversarial test "
            f"images (PGD against the full model) against a memory of {self.n_memory} clean "
            "training images, cosine similarity, weights exp(sim/0.07)."
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


def feature_analysis(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    x_memory: torch.Tensor,
    y_memory: torch.Tensor,
    *,
    num_classes: int,
    eps: float,
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
        eps: L∞ radius in pixel units; steps: PGD steps (random start).
    """
    name, blk = pick_block(model, block)
    was = model.training
    model.eval()
    report = FeatureReport(
        block=name,
        eps=eps,
        attack=f"PGD-{steps}",
        n_test=len(x_test),
        n_memory=len(x_memory),
        ks=list(ks),
    )
    try:
        x_adv_full = pgd_batches(model, x_test, y_test, eps, steps, batch_size, seed)
        memory = block_features(model, blk, x_memory, batch_size)
        queries = block_features(model, blk, x_adv_full, batch_size)
        for variant, attr in VARIANTS.items():
            if variant not in memory:
                continue
            with use_part(blk, attr):
                report.clean_acc[variant] = _accuracy(model, x_test, y_test, batch_size)
                x_adv = (
                    x_adv_full
                    if attr == "out"
                    else pgd_batches(model, x_test, y_test, eps, steps, batch_size, seed)
                )
                report.adv_acc[variant] = _accuracy(model, x_adv, y_test, batch_size)
            report.knn_acc[variant] = {}
            for k in ks:
                pred = weighted_knn(memory[variant], y_memory, queries[variant], k, num_classes)
                report.knn_acc[variant][k] = 100.0 * float((pred == y_test).float().mean())
            log.info(
                "%s: clean %.2f, %s %.2f, kNN %s",
                variant,
                report.clean_acc[variant],
                report.attack,
                report.adv_acc[variant],
                ", ".join(f"k={k} {v:.2f}" for k, v in report.knn_acc[variant].items()),
            )
    finally:
        model.train(was)
    return report
