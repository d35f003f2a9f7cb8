"""Sharded evaluation: the same per-point results from 1 process, N ranks or N job-array slices.

The points are cut into fixed chunks of ``batch_size`` consecutive points (chunk ``c`` holds
points ``[c * batch_size, (c + 1) * batch_size)``). Every attack works chunk by chunk and draws
its randomness from (seed, chunk) only, so a point's outcome does not depend on which process
evaluated its chunk. A shard ``i/n`` owns the chunks ``c`` with ``c % n == i`` (round robin, so
slow and fast chunks spread evenly).

Every evaluation ends the same way: each process builds a *partial* report (its chunks filled,
the others False, plus the raw per-point data of the gradient-masking checks), the partials are
joined (:func:`merge_partials`: all-gather under ``torchrun``, ``fortify report --merge`` for
``--shard`` slices, a single partial otherwise) and the result checks and masking verdicts are
computed once on the joined data (:func:`finalize`). One code path, so the tables and per-point
outcomes of 1 process, N ranks and N merged slices are equal bit for bit (given the same
kernels: see docs/scaling.md for what is not deterministic on GPUs).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fortify.errors import ConfigError, DataError
from fortify.evaluate.outcome import Check, Outcome
from fortify.evaluate.report import NATURAL, EvalReport

log = logging.getLogger(__name__)

CHECK_DATA = "check_data"  # extras key of a partial report: raw per-point data of the checks
# Settings that every slice of one evaluation must share (``fortify report --merge`` compares).
MUST_MATCH = (
    "suite",
    "suite_options",
    "eps",
    "norm",
    "n_points",
    "seed",
    "mode",
    "batch_size",
    "checks",
    "check_points",
    "square_queries",
    "num_classes",
    "image_shape",
    "model_digest",
    "points_sha256",
)
# Settings that legitimately differ between slices (not compared, taken from slice 0).
PER_SLICE = ("shard", "seconds", "device", "versions", "num_threads", "num_interop_threads")


@dataclass(frozen=True)
class Shard:
    """Slice ``index`` of ``count``: the chunks ``c`` with ``c % count == index``."""

    index: int = 0
    count: int = 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless ``0 <= index < count``."""
        ok = isinstance(self.index, int) and isinstance(self.count, int)
        if not ok or self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"shard {self.index}/{self.count} is invalid: it must be i/n with integers "
                "0 <= i < n (e.g. 0/3, 1/3, 2/3)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` → ``Shard(i, n)`` (e.g. a Slurm array index and the array size)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ConfigError(
                f"--shard {text!r} is not of the form i/n (slice i of n, 0 <= i < n), e.g. 0/3"
            )
        shard = cls(int(m.group(1)), int(m.group(2)))
        shard.validate()
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, start: int, chunk_size: int) -> bool:
        """True if the chunk beginning at point ``start`` is this slice's."""
        return (start // chunk_size) % self.count == self.index

    def mask(self, n: int, chunk_size: int) -> torch.Tensor:
        """Bool (n,): the points of this slice's chunks."""
        chunk = torch.arange(n) // chunk_size
        return chunk % self.count == self.index


def points_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of the evaluated points (images as float32, labels as int64): two reports (or
    slices of one evaluation) with the same fingerprint were computed on the same points in the
    same order. The report's ``points_sha256``; the one digest of evaluated data."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def digest_tensors(tensors: Sequence[torch.Tensor]) -> str:
    """A short SHA-256 of the tensors' dtypes, shapes and bytes (CPU copies)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """Digest of a model's parameters and buffers (names, shapes, values)."""
    state = model.state_dict()
    h = hashlib.sha256(",".join(state).encode()).hexdigest()
    return digest_tensors([torch.tensor(list(h.encode()), dtype=torch.uint8), *state.values()])


# --------------------------------------------------------------------------- joining partials


@dataclass
class Results:
    """Joined per-point outcomes of every slice, for the checks computed on all points."""

    outcomes: list[Outcome]
    clean_correct: torch.Tensor
    mode: str
    eps: float
    norm: str
    checks: list[Check] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False  # no warning logs (ranks other than 0)

    @property
    def n(self) -> int:
        return len(self.clean_correct)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("final", "best") if self.mode == "both" else (self.mode,)

    def check(self, name: str, status: str, message: str, *, masking: bool = False) -> None:
        self.checks.append(Check(name, status, message, masking))
        if status != "ok" and not self.quiet:
            log.warning("%s: %s", name, message)

    def add(self, outcome: Outcome) -> Outcome:
        outcome.correct = outcome.correct.detach().to("cpu", torch.bool)
        self.outcomes.append(outcome)
        return outcome


def _slice_of(report: EvalReport) -> Shard:
    s = report.settings.get("shard", "0/1")
    return Shard.parse(s)


def check_slices(partials: Sequence[EvalReport]) -> None:
    """Refuse slices that are not exactly the slices 0..n-1 of one evaluation."""
    if not partials:
        raise DataError("no evaluation slices to merge")
    shards = [_slice_of(p) for p in partials]
    counts = {s.count for s in shards}
    if len(counts) != 1:
        raise DataError(
            f"the slices come from different splits ({', '.join(map(str, shards))}); merge the "
            "slices i/n of one split, all with the same n"
        )
    (count,) = counts
    got = sorted(s.index for s in shards)
    if got != list(range(count)):
        missing = sorted(set(range(count)) - set(got))
        dup = sorted({i for i in got if got.count(i) > 1})
        raise DataError(
            f"slices of a {count}-way split must each appear once: "
            + (f"missing {', '.join(f'{i}/{count}' for i in missing)}" if missing else "")
            + ("; " if missing and dup else "")
            + (f"given twice {', '.join(f'{i}/{count}' for i in dup)}" if dup else "")
        )
    ref = partials[0].settings
    for p, s in zip(partials[1:], shards[1:], strict=True):
        diff = [k for k in MUST_MATCH if p.settings.get(k) != ref.get(k)]
        if diff:
            detail = "; ".join(f"{k}: {ref.get(k)!r} vs {p.settings.get(k)!r}" for k in diff)
            raise DataError(
                f"slice {s} does not belong to the same evaluation as slice {shards[0]} "
                f"(different {', '.join(diff)}: {detail}); merge only slices of one model, "
                "data, suite, ε and seed"
            )
    cols = [(o.name, o.mode) for o in partials[0].outcomes]
    for p, s in zip(partials[1:], shards[1:], strict=True):
        if [(o.name, o.mode) for o in p.outcomes] != cols:
            raise DataError(f"slice {s} has different columns than slice {shards[0]}")


def merge_checks(groups: Sequence[Sequence[Check]]) -> list[Check]:
    """Union of the slices' checks in order; an ``ok`` is dropped when the same check warned."""
    seen: dict[tuple[str, str, str, bool], Check] = {}
    for checks in groups:
        for c in checks:
            seen.setdefault((c.name, c.status, c.message, c.masking), c)
    bad = {c.name for c in seen.values() if c.status != "ok"}
    return [c for c in seen.values() if c.status != "ok" or c.name not in bad]


def merge_partials(partials: Sequence[EvalReport]) -> EvalReport:
    """Join slices into one report (not yet checked: call :func:`finalize`).

    Each point's outcome is taken from the slice that owns its chunk. A column's ``seconds``
    is the longest slice's; ``settings["seconds_total"]`` sums the slices' evaluation times.
    """
    check_slices(partials)
    ref = partials[0]
    n = int(ref.settings["n_points"])
    chunk = int(ref.settings["batch_size"])
    masks = [_slice_of(p).mask(n, chunk) for p in partials]
    outcomes = []
    for j, o in enumerate(ref.outcomes):
        correct = torch.zeros(n, dtype=torch.bool)
        ran = torch.zeros(n, dtype=torch.bool)
        for p, m in zip(partials, masks, strict=True):
            po = p.outcomes[j]
            correct |= po.correct.to(torch.bool) & m
            ran |= (torch.ones(n, dtype=torch.bool) if po.ran is None else po.ran) & m
        seconds = max(p.outcomes[j].seconds for p in partials)
        outcomes.append(
            Outcome(
                o.name,
                correct,
                o.mode,
                o.ensemble,
                seconds,
                o.note,
                ran=ran,
                computed=o.computed,
            )
        )
    data = None
    if ref.extras.get(CHECK_DATA) is not None:
        data = dict(ref.extras[CHECK_DATA])
        for key, value in ref.extras[CHECK_DATA].items():
            if key.startswith("pt_") and value is not None:
                joined = torch.zeros(torch.as_tensor(value).shape, dtype=torch.bool)
                for p in partials:
                    joined |= torch.as_tensor(p.extras[CHECK_DATA][key], dtype=torch.bool)
                data[key] = joined
    extras = {k: v for k, v in ref.extras.items() if k != CHECK_DATA}
    settings = {k: v for k, v in ref.settings.items() if k != "shard"}
    settings["seconds"] = max(float(p.settings.get("seconds", 0.0)) for p in partials)
    if len(partials) > 1:
        settings["slices"] = len(partials)
        settings["seconds_total"] = round(
            sum(float(p.settings.get("seconds", 0.0)) for p in partials), 2
        )
    merged = EvalReport(settings, outcomes, merge_checks([p.checks for p in partials]), extras)
    merged.extras[CHECK_DATA] = data
    return merged


def finalize(merged: EvalReport, *, quiet: bool = False) -> EvalReport:
    """Result checks and gradient-masking verdicts on the joined per-point data."""
    from fortify.evaluate import checks as honesty

    s = merged.settings
    natural = next((o for o in merged.outcomes if o.name == NATURAL), None)
    if natural is None:
        raise DataError("the evaluation slices have no Natural column")
    res = Results(
        outcomes=merged.outcomes,
        clean_correct=natural.correct,
        mode=s["mode"],
        eps=float(s["eps"]),
        norm=s["norm"],
        checks=list(merged.checks),
        extras={k: v for k, v in merged.extras.items() if k != CHECK_DATA},
        quiet=quiet,
    )
    honesty.result_checks(res)
    data = merged.extras.get(CHECK_DATA)
    if data is not None:
        honesty.masking_verdicts(res, data)
    return EvalReport(dict(s), res.outcomes, res.checks, res.extras)


def partial_report(report: EvalReport, check_data: dict[str, Any] | None) -> EvalReport:
    """``report`` with the raw check data attached as JSON-safe lists (one slice's result)."""
    data = None
    if check_data is not None:
        data = {
            k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in check_data.items()
        }
    report.extras[CHECK_DATA] = data
    return report


def complete(
    report: EvalReport, check_data: dict[str, Any] | None, part: Shard, *, distributed: bool
) -> EvalReport:
    """One slice's ``report`` (and its raw check data) made final: with one slice it is
    finalized; under ``torchrun`` the ranks' slices are gathered, joined and finalized; a
    separate (job-array) slice is returned as a partial report for ``fortify report --merge``."""
    partial = partial_report(report, check_data)
    if part.count == 1:
        partials = [partial]
    elif distributed:
        partials = gather(partial)
    else:
        return partial
    return finalize(merge_partials(partials), quiet=part.index != 0)


def gather(partial: EvalReport) -> list[EvalReport]:
    """Every rank's partial report, in rank order (all-gather over the default group)."""
    import torch.distributed as dist

    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, partial.to_dict())
    return [EvalReport.from_dict(d) for d in box]


def load_partials(paths: Sequence[Any]) -> list[EvalReport]:
    """Load slice reports written by ``fortify eval --shard i/n``."""
    out = []
    for p in paths:
        rep = EvalReport.load(p)
        if "shard" not in rep.settings or CHECK_DATA not in rep.extras:
            raise DataError(
                f"{p} is not an evaluation slice (no 'shard' setting); merge the files written "
                "by `fortify eval --shard i/n`"
            )
        out.append(rep)
    return out
