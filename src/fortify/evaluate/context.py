"""The context a suite runs in: :class:`SuiteContext` (points, threat model, columns, checks).

Also the helpers of suites that attack only the first k points (:func:`first_points`,
:func:`attack_first`, :func:`first_points_note`) and the progress display of attacks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fortify.attacks import fgsm_attack, pgd_attack
from fortify.errors import EvaluationError
from fortify.evaluate.outcome import Check, Outcome
from fortify.evaluate.shard import Shard

log = logging.getLogger(__name__)

#: Tolerance of the ε-ball check of every adversarial example (pixel units).
BALL_TOL = 1e-6


def first_points(n: int, limit: int | None) -> int:
    """How many of ``n`` points an attack limited to the first ``limit`` (None: all) sees."""
    return n if limit is None else min(n, limit)


def attack_first(
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    n_in: int,
) -> torch.Tensor:
    """``attack(x, y)`` on the first ``n_in`` points of a batch; the rest are returned unchanged.

    The points beyond ``n_in`` were not attacked: their column must not count them (give the
    outcome ``ran=first_mask(n, k)``) and its note says so (:func:`first_points_note`).
    """
    n_in = max(0, min(len(xb), n_in))
    if n_in == 0:
        return xb
    adv = attack(xb[:n_in], yb[:n_in])
    return adv if n_in == len(xb) else torch.cat([adv, xb[n_in:]])


def first_points_note(what: str, k: int, n: int) -> str:
    """The column note of an attack run on the first ``k`` of ``n`` points ("" when k = n)."""
    if k >= n:
        return ""
    return (
        f"{what} on the first {k} of {n} points; the other {n - k} were not attacked and this "
        f"column (and every worst case containing it) counts only those {k}"
    )


#: Off a terminal, an attack logs its progress at most this often (seconds).
PROGRESS_LOG_SECONDS = 30.0


class _LogProgress:
    """Progress for a run without a terminal (a log file, a CI job): a line at most every
    :data:`PROGRESS_LOG_SECONDS` with the batches done, the time so far and an estimate of the
    time left."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.done += k
        now = time.monotonic()
        if self.done < self.total and now - self.last >= PROGRESS_LOG_SECONDS:
            left = (now - self.start) / self.done * (self.total - self.done)
            log.info(
                "%s: %d/%d batches, %.0f s so far, about %.0f s left",
                self.desc, self.done, self.total, now - self.start, left,
            )  # fmt: skip
            self.last = now

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    if enabled is None and not sys.stderr.isatty():
        return _LogProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=enabled is False, leave=False)


@dataclass
class SuiteContext:
    """Everything a suite needs; suites append :class:`Outcome` columns and :class:`Check` s."""

    model: nn.Module
    x: torch.Tensor  # (N, C, H, W) float in [0, 1], on CPU or device
    y: torch.Tensor  # (N,) int64
    eps: float
    norm: str
    batch_size: int
    seed: int
    mode: str  # final | best | both
    device: torch.device
    num_classes: int
    clean_correct: torch.Tensor  # bool (N,), CPU
    run_checks: bool = True
    progress: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)  # suite_options, names checked
    outcomes: list[Outcome] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # added to the report's settings
    shard: Shard = field(default_factory=Shard)  # the chunks this process evaluates

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def n_batches(self) -> int:
        """How many chunks :meth:`batches` yields (this process's share)."""
        return sum(self.shard.owns(i, self.batch_size) for i in range(0, self.n, self.batch_size))

    @property
    def modes(self) -> tuple[str, ...]:
        """The rows to produce: ``("final",)``, ``("best",)`` or ``("final", "best")``."""
        return ("final", "best") if self.mode == "both" else (self.mode,)

    def batches(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """``(slice, x_batch, y_batch)`` on the evaluation device, one per chunk of this shard.

        A chunk is ``batch_size`` consecutive points from a multiple of ``batch_size``; attacks
        must take their randomness from (seed, ``slice.start``) only (see ``generator``).
        """
        for i in range(0, self.n, self.batch_size):
            if not self.shard.owns(i, self.batch_size):
                continue
            sl = slice(i, min(i + self.batch_size, self.n))
            yield sl, self.x[sl].to(self.device), self.y[sl].to(self.device)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A seeded generator on the evaluation device (for random starts)."""
        dev = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        return torch.Generator(device=dev).manual_seed(self.seed * 1000003 + salt)

    def check(self, name: str, status: str, message: str, *, masking: bool = False) -> None:
        """Record a check (status ``ok`` / ``warn`` / ``fail``); warnings are also logged.

        ``masking``: the check looks for gradient masking; its warning makes the report
        unreliable.
        """
        self.checks.append(Check(name, status, message, masking))
        if status != "ok":
            log.warning("%s: %s", name, message)

    def add(self, outcome: Outcome) -> Outcome:
        """Append a column outcome (``correct`` moved to CPU bool)."""
        outcome.correct = outcome.correct.detach().to("cpu", torch.bool)
        self.outcomes.append(outcome)
        return outcome

    def verify_ball(
        self, name: str, x_adv: torch.Tensor, xb: torch.Tensor, eps: float | None = None
    ) -> None:
        """Hard check: every example within ε (+1e-6) of ``xb`` (``self.norm``) and in [0, 1]."""
        eps = self.eps if eps is None else eps
        if x_adv.shape != xb.shape:
            raise EvaluationError(
                f"{name}: adversarial batch has shape {tuple(x_adv.shape)}, expected "
                f"{tuple(xb.shape)}"
            )
        d = (x_adv.float() - xb.float()).flatten(1)
        dist = d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)
        if not bool(torch.isfinite(x_adv).all()):
            raise EvaluationError(f"{name}: adversarial examples contain NaN/Inf")
        worst = float(dist.max())
        if worst > eps + BALL_TOL:
            raise EvaluationError(
                f"{name}: an adversarial example lies outside the {self.norm} ball: distance "
                f"{worst:.8g} > "
                f"eps {eps:.8g} (+{BALL_TOL}); the result would be invalid"
            )
        lo, hi = float(x_adv.min()), float(x_adv.max())
        if lo < 0.0 or hi > 1.0:
            raise EvaluationError(
                f"{name}: adversarial examples leave [0, 1] (range [{lo:.6g}, {hi:.6g}])"
            )

    @torch.no_grad()
    def predict(self, xb: torch.Tensor) -> torch.Tensor:
        """Predicted classes of a batch (one forward)."""
        return self.model(xb).argmax(1)

    def run_attack(
        self,
        name: str,
        fn: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor],
        *,
        ensemble: bool = True,
        note: str = "",
        eps: float | None = None,
        ran: torch.Tensor | None = None,
    ) -> list[Outcome]:
        """Run a single-shot attack ``fn(x_batch, y_batch, slice) -> x_adv`` batch by batch.

        Every batch is checked against the ball, re-classified with one forward, and added as
        one column per row (in ``best`` rows clean-misclassified points also count as broken).
        ``ran`` (bool (N,), None: all) marks the points ``fn`` really attacks; only they count.
        """
        t0 = time.perf_counter()
        correct = torch.zeros(self.n, dtype=torch.bool)
        bar = progress_bar(self.n_batches, name, self.progress)
        for sl, xb, yb in self.batches():
            x_adv = fn(xb, yb, sl)
            self.verify_ball(name, x_adv, xb, eps)
            correct[sl] = (self.predict(x_adv) == yb).cpu()
            bar.update(1)
        bar.close()
        dt = time.perf_counter() - t0
        out = []
        for m in self.modes:
            c = correct if m == "final" else correct & self.clean_correct
            out.append(self.add(Outcome(name, c, m, ensemble, dt, note, ran)))
        return out

    def run_fgsm(self, name: str = "FGSM", *, ensemble: bool = True, **kw: Any) -> list[Outcome]:
        """FGSM column (L∞); ``kw`` go to :func:`fortify.attacks.fgsm_attack`."""
        if self.norm != "linf":
            self.check(name, "warn", "FGSM is an L∞ attack; skipped for the L2 threat model")
            return []
        return self.run_attack(
            name,
            lambda xb, yb, sl: (
                fgsm_attack(self.model, xb, yb, eps=self.eps, need_success=False, **kw).x_adv
            ),
            ensemble=ensemble,
        )

    def run_pgd(
        self, name: str, *, ensemble: bool = True, note: str = "", **kw: Any
    ) -> list[Outcome]:
        """PGD column(s) for the context's mode(s); ``kw`` go to :func:`fortify.attacks.pgd_attack`.

        ``final``: last iterate. ``best``: a point is broken once any iterate fooled the model
        (clean-misclassified points count as broken). ``both``: one run yields both rows and
        best ⊆ final is enforced point-wise.
        """
        kw.setdefault("eps", self.eps)
        kw.setdefault("norm", self.norm)
        salt = sum(map(ord, name))
        t0 = time.perf_counter()
        final = torch.zeros(self.n, dtype=torch.bool)
        best = torch.zeros(self.n, dtype=torch.bool)
        mismatches = 0
        bar = progress_bar(self.n_batches, name, self.progress)
        for sl, xb, yb in self.batches():
            gen = self.generator(salt + sl.start) if kw.get("random_start", True) else None
            if self.mode == "final":
                r = pgd_attack(
                    self.model, xb, yb, mode="final", generator=gen, need_success=False, **kw
                )
                self.verify_ball(name, r.x_adv, xb, kw["eps"])
                final[sl] = (self.predict(r.x_adv) == yb).cpu()
            elif self.mode == "best":
                r = pgd_attack(self.model, xb, yb, mode="best", generator=gen, **kw)
                self.verify_ball(name, r.x_adv, xb, kw["eps"])
                fooled = (self.predict(r.x_adv) != yb).cpu()
                mismatches += int((r.success.cpu() & ~fooled).sum())
                best[sl] = ~fooled
            else:
                r = pgd_attack(self.model, xb, yb, mode="both", generator=gen, **kw)
                assert r.x_best is not None
                self.verify_ball(name, r.x_adv, xb, kw["eps"])
                self.verify_ball(name, r.x_best, xb, kw["eps"])
                final[sl] = (self.predict(r.x_adv) == yb).cpu()
                best[sl] = (self.predict(r.x_best) == yb).cpu() & final[sl]
            bar.update(1)
        bar.close()
        if mismatches:
            self.check(
                f"{name} re-verification",
                "warn",
                f"{mismatches} point(s) fooled the model inside the attack's batch but not when "
                "re-classified "
                "(batch-size dependent numerics); they are counted as robust",
            )
        dt = time.perf_counter() - t0
        out = []
        if "final" in self.modes:
            out.append(self.add(Outcome(name, final, "final", ensemble, dt, note)))
        if "best" in self.modes:
            out.append(
                self.add(Outcome(name, best & self.clean_correct, "best", ensemble, dt, note))
            )
        return out
