"""The evaluation driver: :func:`evaluate` runs a registered suite on a model and returns its
:class:`EvalReport` (clean pass and output contract, the suite, the honest-evaluation checks,
settings, sharding)."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fortify.attacks.inputs import first_forward
from fortify.attacks.options import plain_scalar
from fortify.errors import ConfigError, check_point_count
from fortify.evaluate import checks as honesty
from fortify.evaluate import validation
from fortify.evaluate.context import SuiteContext
from fortify.evaluate.outcome import MODE_FREE, Outcome
from fortify.evaluate.registry import describe_option, get_suite, suites_with
from fortify.evaluate.report import NATURAL, EvalReport
from fortify.evaluate.shard import (
    MUST_MATCH,
    PER_SLICE,
    Shard,
    complete,
    model_digest,
    points_fingerprint,
)
from fortify.utils.runtime import compute_record, resolve_device

log = logging.getLogger(__name__)

EVAL_MODES = ("final", "best", "both")

#: Report settings that :func:`evaluate` (with its suites and sharding) records itself;
#: ``settings=`` may add other entries, never replace these.
RESERVED_SETTINGS = (
    *MUST_MATCH,  # what every slice of one evaluation shares
    *PER_SLICE,  # what a slice records about itself
    "model",
    "precision",
    "autoattack_points",
    "autoattack_scope",
    "slices",
    "seconds_total",
)


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[bool]:
    """Put every submodule in eval mode; restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    was_training = any(t for _, t in flags)
    model.eval()
    try:
        yield was_training
    finally:
        for m, t in flags:
            m.training = t


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (else buffer) of ``model``; CPU if it has neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


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
        device: where to run (the model is moved there): ``auto | cpu | cuda | cuda:N | mps``
            or a ``torch.device``; None: the model's device.
        seed: an integer in [0, 2**63 - 1]. check_points: an integer >= 1 (when ``checks``).
        square_queries: query budget of the black-box Square check, an integer >= 1.
        progress: tqdm bars (None: only when stderr is a TTY).
        settings: extra entries recorded in the report's settings (a dict with str keys other
            than :data:`RESERVED_SETTINGS`, which the evaluation records itself).
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
    validation.check_images_labels(x, y)
    x = x.detach()  # the points are only read: never a graph back to the caller's tensor
    validation.check_model(model, x)
    if mode not in EVAL_MODES:
        raise ConfigError(f"unknown evaluation mode {mode!r}; allowed: {', '.join(EVAL_MODES)}")
    eps = plain_scalar(eps)  # type: ignore[assignment]  # np.float32(8/255) is a number too
    validation.check_eps(eps, norm, tuple(x.shape[1:]))
    validation.check_run_options(
        batch_size=batch_size,
        seed=seed,
        checks=checks,
        check_points=check_points,
        square_queries=square_queries,
    )
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None (auto), got {progress!r}")
    extra_settings = validation.check_extra_settings(settings, RESERVED_SETTINGS)
    spec = get_suite(suite)
    options = spec.check_options(suite_options)
    part = _resolve_shard(shard, distributed)
    if part.count > 1 and not spec.shardable:
        shardable = suites_with(lambda s: s.shardable)
        raise ConfigError(
            f"evaluation suite {suite!r} cannot be sharded (it does not split its work into "
            f"chunks of points); run it in one process. Shardable suites: {', '.join(shardable)}"
        )
    dev = resolve_device(device) if device is not None else model_device(model)
    if device is not None:
        model.to(dev)
    y = y.long()
    t_start = time.perf_counter()

    with eval_mode(model) as was_training:
        # Clean pass, with the output contract checked on the first batch.
        correct = torch.zeros(len(x), dtype=torch.bool)
        num_classes = 0
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(dev)
            with torch.no_grad():
                out = model(xb) if i else first_forward(model, xb)
            if i == 0:
                logits = validation.check_logits(out, len(xb), device=xb.device)
                num_classes = logits.shape[1]
                validation.check_deterministic(model, xb, logits)
            else:
                validation.check_logits(out, len(xb), device=xb.device)
            correct[i : i + len(xb)] = out.argmax(1).cpu() == y[i : i + len(xb)].cpu()
        validation.check_labels_range(y, num_classes)

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
        **compute_record(dev),  # device, precision (evaluation runs in fp32), thread counts
        "seconds": round(time.perf_counter() - t_start, 2),
        "versions": _versions(),
    }
    report_settings.update(ctx.settings)
    report_settings.update(extra_settings)
    if part.count > 1:
        report_settings["shard"] = str(part)
    report = EvalReport(report_settings, ctx.outcomes, ctx.checks, ctx.extras)
    return complete(report, check_data, part, distributed=distributed)


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
    check_point_count(n_points, "n_points")
    x, y = imageset.head(n_points).floats()
    return evaluate(model, x, y, eps=eps, **kwargs)
