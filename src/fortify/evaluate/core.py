"""The evaluator: suite registry, the context suites run in, and :func:`evaluate`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import nn

from fortify.attacks import fgsm_attack, pgd_attack
from fortify.errors import ConfigError, DataError, EvaluationError, FortifyError, unknown_name
from fortify.evaluate.report import MODE_FREE, NATURAL, Check, EvalReport, Outcome
from fortify.evaluate.shard import (
    Shard,
    digest_tensors,
    finalize,
    gather,
    merge_partials,
    model_digest,
    partial_report,
)
from fortify.evaluate.validation import (
    check_deterministic,
    check_eps,
    check_images_labels,
    check_labels_range,
    check_logits,
)
from fortify.utils.runtime import compute_record

log = logging.getLogger("fortify.evaluate")

EVAL_MODES = ("final", "best", "both")
BALL_TOL = 1e-6

SuiteFn = Callable[["SuiteContext"], None]


@dataclass(frozen=True)
class SuiteSpec:
    """A registered suite.

    Attributes:
        options: the option names the suite accepts (``evaluate(..., suite_options=...)``).
        options_type: a dataclass whose fields are those names; when set, the given options are
            checked by building it and calling its ``validate()`` (if any) before the run.
        shardable: the suite attacks chunk by chunk through ``ctx.batches()`` with randomness
            from (seed, chunk) only, so it may run sharded (``torchrun``, ``--shard i/n``).
    """

    name: str
    fn: SuiteFn
    description: str = ""
    options: tuple[str, ...] = ()
    options_type: type | None = None
    shardable: bool = False

    def check_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """A validated copy of ``given``; an unknown name raises :class:`ConfigError`."""
        if given is None:
            return {}
        if not isinstance(given, Mapping):
            raise ConfigError(
                f"suite_options must be a mapping of option name to value, got "
                f"{type(given).__name__}"
            )
        opts = dict(given)
        bad = sorted(str(k) for k in opts if k not in self.options)
        if bad:
            allowed = ", ".join(self.options) if self.options else "none (it takes no options)"
            raise ConfigError(
                f"evaluation suite {self.name!r} does not accept the option(s) {', '.join(bad)}; "
                f"allowed: {allowed}"
            )
        if self.options_type is not None:
            validate = getattr(self.options_type(**opts), "validate", None)
            if callable(validate):
                validate()
        return opts


_SUITES: dict[str, SuiteSpec] = {}
# Modules of other engineers that register suites when imported (optional).
_PLUGIN_MODULES = (
    "fortify.evaluate.suites",
    "fortify.evaluate.ood",
    "fortify.evaluate.adaptive",
    "fortify.evaluate.corruptions",
)


def register_suite(
    name: str,
    fn: SuiteFn | None = None,
    *,
    description: str = "",
    options: Sequence[str] | type | None = None,
    shardable: bool = False,
) -> Any:
    """Register ``fn(ctx: SuiteContext) -> None`` as suite ``name`` (usable as a decorator).

    A suite adds columns through ``ctx.run_pgd``, ``ctx.run_fgsm``, ``ctx.run_attack`` or
    ``ctx.add(Outcome(...))`` and findings through ``ctx.check(name, status, message)``.

    Args:
        options: the option names the suite accepts in ``ctx.options`` (from
            ``evaluate(..., suite_options=...)``), or a dataclass whose fields are those names
            (its ``validate()``, if any, checks the values before the run). None: no options.
        shardable: True if the suite works only through ``ctx.batches()`` (chunks of points)
            and draws randomness from (seed, chunk) only (see :mod:`fortify.evaluate.shard`).
    """
    if options is None:
        names: tuple[str, ...] = ()
        options_type = None
    elif isinstance(options, type):
        if not is_dataclass(options):
            raise ConfigError(
                f"options of suite {name!r} must be a sequence of names or a dataclass, got "
                f"class {options.__name__}"
            )
        names, options_type = tuple(f.name for f in fields(options)), options
    elif isinstance(options, str):
        raise ConfigError(
            f"options of suite {name!r} must be a sequence of names, got the string {options!r}"
        )
    else:
        names, options_type = tuple(options), None

    def deco(f: SuiteFn) -> SuiteFn:
        if name in _SUITES and _SUITES[name].fn is not f:
            raise ConfigError(f"evaluation suite {name!r} is registered twice")
        desc = description or (f.__doc__ or "").strip().split("\n")[0]
        _SUITES[name] = SuiteSpec(name, f, desc, names, options_type, shardable)
        return f

    return deco(fn) if fn is not None else deco


def _ensure_loaded() -> None:
    for mod in _PLUGIN_MODULES:
        with contextlib.suppress(ModuleNotFoundError):
            if importlib.util.find_spec(mod) is not None:
                importlib.import_module(mod)


def available_suites() -> dict[str, str]:
    """``{name: description}`` of every registered suite."""
    _ensure_loaded()
    return {k: v.description for k, v in sorted(_SUITES.items())}


def get_suite(name: str) -> SuiteSpec:
    """The registered suite ``name`` (raises listing the known suites)."""
    _ensure_loaded()
    if name not in _SUITES:
        raise unknown_name("evaluation suite", name, _SUITES)
    return _SUITES[name]


def eval_config_options(eval_cfg: Any) -> dict[str, Any]:
    """The ``suite_options`` an :class:`fortify.config.EvalConfig` implies for its suite.

    ``autoattack_points`` is passed when set and the suite accepts it (``autoattack``, ``full``,
    ``adaptive``); for a suite that runs no AutoAttack it has no effect and a warning says so.
    """
    points = getattr(eval_cfg, "autoattack_points", None)
    if points is None:
        return {}
    spec = get_suite(eval_cfg.suite)
    if "autoattack_points" in spec.options:
        return {"autoattack_points": points}
    takers = sorted(k for k, v in _SUITES.items() if "autoattack_points" in v.options)
    log.warning(
        "eval.autoattack_points=%s has no effect: suite %r does not take it (suites that do: %s)",
        points,
        eval_cfg.suite,
        ", ".join(takers),
    )
    return {}


def describe_option(value: Any) -> Any:
    """A JSON-safe rendering of an option value (modules by class name, paths as strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): describe_option(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [describe_option(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)


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


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
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
        bar = _progress(self.n_batches, name, self.progress)
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
        bar = _progress(self.n_batches, name, self.progress)
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


def _versions() -> dict[str, str]:
    import fortify

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fortify": fortify.__version__,
    }
    for mod in ("numpy", "pyautoattack", "torchvision"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a missing optional package is simply not listed
            pass
    return out


def _first_forward(model: nn.Module, xb: torch.Tensor) -> Any:
    """The first forward pass; a shape error of a third-party model becomes a clear DataError."""
    try:
        return model(xb)
    except FortifyError:
        raise
    except RuntimeError as exc:
        if not any(w in str(exc) for w in ("shape", "size", "channels")):
            raise
        raise DataError(
            f"the model cannot take images of shape (N, C, H, W) = {tuple(xb.shape)}: {exc}. "
            "Give it images with the channel count and size it was built for"
        ) from exc


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[bool]:
    """Put every submodule in eval mode; restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    was_training = any(t for _, t in flags)
    model.eval()
    try:
        yield was_training
    finally:
        for m, t in flags:
            m.training = t


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def points_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of the evaluated points (images as float32, labels as int64): two reports with the
    same fingerprint were computed on the same points in the same order."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    suite: str = "paper",
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    seed: int = 0,
    mode: str = "final",
    checks: bool = True,
    device: torch.device | str | None = None,
    check_points: int = 200,
    square_queries: int = 1000,
    progress: bool | None = None,
    settings: dict[str, Any] | None = None,
    suite_options: Mapping[str, Any] | None = None,
    shard: Shard | str | None = None,
    distributed: bool = False,
) -> EvalReport:
    """Evaluate ``model`` on ``(x, y)`` with an attack suite and honest-evaluation checks.

    Args:
        model: any ``nn.Module`` mapping images in [0, 1] (N, C, H, W) to logits (N, K). It is
            evaluated in eval mode; each submodule's mode is restored afterwards.
        x: float images in [0, 1], shape (N, C, H, W). y: integer labels (N,).
        suite: a registered suite (``paper``, ``autoattack``, ``quick``, ``full``, ...).
        eps: threat-model radius in pixel units (L∞: e.g. 8/255; L2: e.g. 0.5).
        norm: ``"linf"`` or ``"l2"``.
        batch_size: points per attack batch. seed: seeds random starts / Square / AutoAttack.
        mode: ``"final"`` (last iterate), ``"best"`` (any fooling iterate counts) or ``"both"``
            (both rows from the same runs).
        checks: run the gradient-masking checks (on the first ``check_points`` points). The
            ε-ball / [0, 1] verification of every adversarial example always runs.
        device: where to run (the model is moved there); None: the model's device.
        square_queries: query budget of the black-box Square check.
        progress: tqdm bars (None: only when stderr is a TTY).
        settings: extra entries recorded in the report's settings.
        suite_options: options of the suite, e.g. ``{"autoattack_points": 500}`` for
            ``autoattack`` / ``full`` or the :class:`~fortify.evaluate.adaptive.AdaptiveOptions`
            fields for ``adaptive``; names the suite does not accept raise
            :class:`ConfigError`. Recorded in the report's settings as ``suite_options``.
        shard: evaluate only slice ``i/n`` of the chunks (``Shard`` or ``"i/n"``) and return a
            *partial* report (settings ``shard``); join the n slices with
            :func:`fortify.evaluate.shard.merge_partials` + ``finalize`` (``fortify report
            --merge``). Per-point outcomes equal a one-process run's bit for bit.
        distributed: split the chunks over the ranks of the initialised default process group
            (``torchrun``: gloo on CPU, nccl on GPU); every rank returns the joined report.

    Only suites registered with ``shardable=True`` (``paper``, ``quick``, ``autoattack``,
    ``full``) can be sharded.

    Returns:
        :class:`EvalReport` (table, per-sample outcomes, checks, settings).
    """
    check_images_labels(x, y)
    if mode not in EVAL_MODES:
        raise ConfigError(f"unknown evaluation mode {mode!r}; allowed: {', '.join(EVAL_MODES)}")
    check_eps(eps, norm, tuple(x.shape[1:]))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    spec = get_suite(suite)
    options = spec.check_options(suite_options)
    part = _resolve_shard(shard, distributed)
    if part.count > 1 and not spec.shardable:
        shardable = sorted(k for k, v in _SUITES.items() if v.shardable)
        raise ConfigError(
            f"evaluation suite {suite!r} cannot be sharded (it does not split its work into "
            f"chunks of points); run it in one process. Shardable suites: {', '.join(shardable)}"
        )
    dev = torch.device(device) if device is not None else _model_device(model)
    if device is not None:
        model.to(dev)
    y = y.long()
    t_start = time.perf_counter()

    with _eval_mode(model) as was_training:
        # Clean pass, with the output contract checked on the first batch.
        correct = torch.zeros(len(x), dtype=torch.bool)
        num_classes = 0
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(dev)
            with torch.no_grad():
                out = model(xb) if i else _first_forward(model, xb)
            if i == 0:
                logits = check_logits(out, len(xb))
                num_classes = logits.shape[1]
                check_deterministic(model, xb, logits)
            else:
                check_logits(out, len(xb))
            correct[i : i + len(xb)] = out.argmax(1).cpu() == y[i : i + len(xb)].cpu()
        check_labels_range(y, num_classes)

        ctx = SuiteContext(
            model=model,
            x=x,
            y=y,
            eps=float(eps),
            norm=norm,
            batch_size=batch_size,
            seed=seed,
            mode=mode,
            device=dev,
            num_classes=num_classes,
            clean_correct=correct,
            run_checks=checks,
            progress=progress,
            options=options,
            shard=part,
        )
        if was_training:
            ctx.check(
                "model mode",
                "warn",
                "the model was in train mode; it was evaluated in eval mode and its mode "
                "restored afterwards",
            )
        ctx.add(Outcome(NATURAL, correct, MODE_FREE, True))
        spec.fn(ctx)

        from fortify.evaluate import checks as honesty

        check_data = None
        if checks:
            check_data = honesty.masking_data(
                ctx, check_points=check_points, square_queries=square_queries
            )

    report_settings: dict[str, Any] = {
        "suite": suite,
        "suite_options": describe_option(options),
        "eps": float(eps),
        "norm": norm,
        "n_points": len(x),
        "seed": seed,
        "mode": mode,
        "batch_size": batch_size,
        "checks": checks,
        "check_points": min(check_points, len(x)) if checks else 0,
        "square_queries": square_queries if checks else 0,
        "num_classes": num_classes,
        "image_shape": list(x.shape[1:]),
        "points_sha256": points_fingerprint(x, y),
        "model": type(model).__name__,
        "model_digest": model_digest(model),
        "data_digest": digest_tensors([x, y]),
        **compute_record(dev),  # device, precision (evaluation runs in fp32), thread counts
        "seconds": round(time.perf_counter() - t_start, 2),
        "versions": _versions(),
    }
    report_settings.update(ctx.settings)
    report_settings.update(settings or {})
    if part.count > 1:
        report_settings["shard"] = str(part)
    partial = partial_report(
        EvalReport(report_settings, ctx.outcomes, ctx.checks, ctx.extras), check_data
    )
    if distributed and part.count > 1:
        partials = gather(partial)
    elif part.count > 1:
        return partial  # one slice: `fortify report --merge` joins them
    else:
        partials = [partial]
    return finalize(merge_partials(partials), quiet=part.index != 0)


def _resolve_shard(shard: Shard | str | None, distributed: bool) -> Shard:
    if distributed:
        import torch.distributed as dist

        if shard is not None:
            raise ConfigError(
                "shard and distributed exclude each other: under torchrun the ranks are the "
                "shards; use --shard i/n only for separate (job-array) processes"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "distributed=True needs an initialised process group (start with torchrun)"
            )
        return Shard(dist.get_rank(), dist.get_world_size())
    if shard is None:
        return Shard()
    part = Shard.parse(shard) if isinstance(shard, str) else shard
    if not isinstance(part, Shard):
        raise ConfigError(f"shard must be a Shard or 'i/n', got {type(shard).__name__}")
    part.validate()
    return part


def evaluate_split(
    model: nn.Module,
    imageset: Any,
    n_points: int | None = None,
    *,
    eps: float,
    **kwargs: Any,
) -> EvalReport:
    """Evaluate on the first ``n_points`` of a :class:`fortify.data.ImageSet` (all when None)."""
    from fortify.data.base import ImageSet

    if not isinstance(imageset, ImageSet):
        raise ConfigError(
            f"imageset must be a fortify.data.ImageSet, got {type(imageset).__name__}"
        )
    if n_points is not None and n_points < 1:
        raise ConfigError(f"n_points must be >= 1, got {n_points}")
    x, y = imageset.head(n_points).floats()
    return evaluate(model, x, y, eps=eps, **kwargs)
