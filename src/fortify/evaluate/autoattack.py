"""The one adapter between fortify and the reference package ``pyautoattack``.

Every AutoAttack and Square attack of fortify (the ``autoattack`` / ``full`` suites, the
``adaptive`` suite, the masking checks' black-box Square) is built here, with one policy:

- **AutoAttack is always the standard version** (APGD-CE, APGD-T, FAB-T, Square). It needs at
  least :data:`MIN_CLASSES` = 4 classes (targeted DLR); a model with fewer classes raises a
  :class:`~fortify.errors.ConfigError` naming its class count before anything runs — a column
  called "AutoAttack" is never a custom subset of attacks.
- With fewer than 10 classes, APGD-T and FAB-T target the K − 1 other classes (:attr:`note`).
- Each call is one ``run_standard_evaluation`` on the given batch (batch size = the batch), with
  the caller's seed, so a point's outcome depends only on (seed, its batch). pyautoattack
  reseeds the global RNG; the adapter keeps the caller's RNG state untouched.
- pyautoattack's own warnings (randomised or dynamic defence, probability outputs, ...) go to
  its ``auto-attack`` logger; :func:`capture_warnings` collects them for the report's checks.

Inputs are images in [0, 1] (N, C, H, W) on the model's device, labels (N,) int64; ε is in
pixel units of the threat model's norm (``"linf"`` / ``"l2"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fortify.attacks.inputs import check_images, check_labels
from fortify.attacks.options import check_flag, check_norm, check_number
from fortify.errors import ConfigError, DataError, EvaluationError, check_positive_int
from fortify.utils.runtime import check_seed

if TYPE_CHECKING:  # for annotations only
    from fortify.evaluate.context import SuiteContext

log = logging.getLogger(__name__)

#: AutoAttack's standard version needs this many classes (targeted DLR uses the 3rd/4th logits).
MIN_CLASSES = 4
#: The targeted attacks of the standard version use at most this many target classes.
MAX_TARGETS = 9
#: fortify's norm names → pyautoattack's.
NORMS = {"linf": "Linf", "l2": "L2"}


def _pyautoattack() -> Any:
    try:
        import pyautoattack
        import pyautoattack.square
    except ImportError as exc:  # pragma: no cover - pyautoattack is a dependency
        raise EvaluationError(
            "AutoAttack and Square need the 'pyautoattack' package (pip install pyautoattack)"
        ) from exc
    return pyautoattack


def _check_threat(net: object, norm: object, eps: object, seed: object) -> None:
    """Raise :class:`ConfigError` for a ``net`` that cannot be called, a norm other than
    ``linf`` / ``l2``, an ε outside (0, 1] (L∞) or (0, ∞) (L2; pixel units) or a bad seed."""
    if not callable(net):
        raise ConfigError(
            f"net must be an nn.Module mapping images to logits, got {type(net).__name__}"
        )
    check_norm(norm)
    top = 1.0 if norm == "linf" else math.inf
    check_number(eps, f"eps ({norm}, pixel units)", 0.0, top, open_low=True)
    check_seed(seed)


def _checked_batch(x: object, y: object) -> int:
    """Check a batch (:func:`~fortify.attacks.inputs.check_images`, labels int (N,) >= 0) as
    the attacks do; return the largest label."""
    check_images(x)
    assert isinstance(x, torch.Tensor)
    return check_labels(y, x.shape[0], "y")[1]


def _rng_devices(device: torch.device | str) -> list[torch.device]:
    dev = torch.device(device)
    return [dev] if dev.type == "cuda" else []


def check_classes(num_classes: int, *, instead: str) -> None:
    """Raise :class:`ConfigError` unless AutoAttack's standard version can run on K classes.

    Args:
        instead: what the user can do instead (ends the message), e.g. "use suite 'paper'".
    """
    check_positive_int(num_classes, "num_classes (K, the model's number of logits)")
    if num_classes < MIN_CLASSES:
        raise ConfigError(
            f"AutoAttack's standard version needs at least {MIN_CLASSES} classes (targeted "
            f"DLR), the model has {num_classes}; {instead}"
        )


class StandardAutoAttack:
    """AutoAttack (standard version) on ``net``; call it as ``attack(x, y) -> x_adv``.

    Args:
        net: maps images in [0, 1] (N, C, H, W) to logits (N, K).
        num_classes: K; fewer than :data:`MIN_CLASSES` raises :class:`ConfigError`.
        norm: ``"linf"`` or ``"l2"``. eps: radius in pixel units. seed: AutoAttack's seed.
        device: where the batches live.
        instead: the advice of the too-few-classes error (see :func:`check_classes`).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int,
        norm: str,
        eps: float,
        seed: int,
        device: torch.device | str,
        instead: str = "use suite 'paper' or 'quick'",
    ) -> None:
        check_classes(num_classes, instead=instead)
        _check_threat(net, norm, eps, seed)
        pyautoattack = _pyautoattack()
        self.num_classes = num_classes
        self.device = device
        self.adversary = pyautoattack.AutoAttack(
            net, norm=NORMS[norm], eps=eps, version="standard", device=device, seed=seed
        )
        self.adversary.verbose = False
        self.targets = min(MAX_TARGETS, num_classes - 1)
        self.adversary.apgd_targeted.n_target_classes = self.targets
        self.adversary.fab.n_target_classes = self.targets

    @classmethod
    def in_context(
        cls, ctx: SuiteContext, net: nn.Module | None = None, *, instead: str
    ) -> StandardAutoAttack:
        """AutoAttack on ``net`` (default: the context's model) with the context's number of
        classes, norm, ε, seed and device — how every suite builds it."""
        net = ctx.model if net is None else net
        return cls(
            net, num_classes=ctx.num_classes, norm=ctx.norm, eps=ctx.eps, seed=ctx.seed,
            device=ctx.device, instead=instead,
        )  # fmt: skip

    @property
    def note(self) -> str:
        """The column note on the target classes ("" with 10 classes or more)."""
        if self.targets >= MAX_TARGETS:
            return ""
        return f"APGD-T/FAB-T with {self.targets} target classes (model has {self.num_classes})"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples of the batch ``x`` (N, C, H, W) in [0, 1] with labels ``y``
        (N,) in [0, K)."""
        top = _checked_batch(x, y)
        if top >= self.num_classes:
            raise DataError(
                f"labels must be class indices in [0, K) = [0, {self.num_classes}), got {top}"
            )
        with torch.random.fork_rng(devices=_rng_devices(x.device)):
            out = self.adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return (out[0] if isinstance(out, tuple) else out).detach()


class Square:
    """pyautoattack's Square attack (score-based black box); ``attack(x, y) -> x_adv``.

    Args:
        net: maps images in [0, 1] (N, C, H, W) to logits (N, K).
        norm: ``"linf"`` or ``"l2"``. eps: radius in pixel units. queries: the query budget.
        seed: Square's seed (it reseeds per call). device: where the batches live.
        rescale_schedule: rescale the ``p`` schedule to the budget (pyautoattack's
            ``resc_schedule``; the reference uses it for budgets under 5000 queries).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        norm: str,
        eps: float,
        queries: int,
        seed: int,
        device: torch.device | str,
        rescale_schedule: bool,
    ) -> None:
        _check_threat(net, norm, eps, seed)
        check_positive_int(queries, "queries (Square's query budget)")
        check_flag(rescale_schedule, "rescale_schedule")
        pyautoattack = _pyautoattack()
        self.attack = pyautoattack.square.SquareAttack(
            net,
            norm=NORMS[norm],
            n_queries=queries,
            eps=eps,
            p_init=0.8,
            n_restarts=1,
            seed=seed,
            verbose=False,
            device=device,
            resc_schedule=rescale_schedule,
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples of the batch ``x`` (N, C, H, W) in [0, 1] with labels ``y``
        (N,)."""
        _checked_batch(x, y)
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(x.device)):
            return self.attack.perturb(x, y).detach()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """Collect pyautoattack's own warnings (its logger and ``warnings``) raised in the block.

    Yields a list that holds, after the block, each distinct message once, in order.
    """
    handler = _Collect()
    aa_log = logging.getLogger("auto-attack")
    aa_log.addHandler(handler)
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        aa_log.removeHandler(handler)
    found.extend(dict.fromkeys(handler.messages + [str(w.message) for w in caught]))
