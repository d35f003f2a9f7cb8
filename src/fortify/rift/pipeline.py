"""The RiFT workflow on a run directory, step by step and resumable.

``RUN/rift/<step>/`` holds each step's output and a ``done.json`` marker written last; a rerun
skips finished steps (``force=True`` redoes them). A marker or stored result that cannot be read
counts as unfinished: the step is computed again with a warning naming the file, and its new
output replaces the unreadable file (the fine-tuning folder is moved aside, as for changed
options). Steps:

1. ``mrc``: fixed PGD-10 set from the VALIDATION split → MRC of every Conv2d/Linear weight.
2. ``finetune``: the chosen module's weight on clean training data (a fit run in the folder).
3. ``interpolate``: θ_α grid on VALIDATION (clean + PGD-10), α* by the paired rule, the chosen
   model saved as ``rift.safetensors`` (a fortify checkpoint).
4. ``evaluate``: θ_AT and θ_α* on TEST with the paper suite, AutoAttack and OOD.

The options are :class:`~fortify.rift.config.RiftConfig`; step 4's evaluation is
:mod:`fortify.rift.evaluation`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fortify.config.loader import from_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.errors import ConfigError, FortifyError
from fortify.rift.config import RiftConfig
from fortify.rift.evaluation import evaluate_models, summary_markdown
from fortify.runs.rundir import Mode
from fortify.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

STEPS = ("mrc", "finetune", "interpolate", "evaluate")
T = TypeVar("T")
# what reading a stored step file may raise when it is truncated, garbage or of another shape
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, FortifyError)


def _adversarial_objective(exp: ExperimentConfig) -> bool:
    """Whether the run's training objective crafts adversarial examples (AT, TRADES, MART…).

    ``standard`` and ``fpd`` (noisy inputs, no attack) are not; an objective that cannot be
    instantiated any more counts as not adversarial, so the caller warns rather than assumes.
    """
    from fortify.train.objectives import get_objective

    try:
        objective = get_objective(exp.train.objective, exp.train)
    except FortifyError:
        return False
    return bool(getattr(objective, "adversarial", False))


class RiftRun:
    """A RiFT workflow attached to an AT run directory ``run`` (outputs in ``run/rift``)."""

    def __init__(
        self, run: str | Path, cfg: RiftConfig | None = None, out: str | Path | None = None
    ):
        from fortify.runs import load_model
        from fortify.utils.runtime import resolve_device

        self.run = Path(run)
        self.cfg = (cfg or RiftConfig()).validate()  # every step's options, before any step
        self.out = Path(out) if out is not None else self.run / "rift"
        self.device = resolve_device(self.cfg.device)
        self.model, self.meta = load_model(self.run, tag=self.cfg.tag, device=self.device)
        self.exp = from_dict(ExperimentConfig, self.meta["config"])
        self._splits: DataSplits | None = None
        self._reused: set[str] = set()
        #: steps whose result was read from an earlier call (not computed in this process)
        self.reused_steps: set[str] = set()
        self.adversarial = _adversarial_objective(self.exp)
        if not self.adversarial:
            log.warning(
                "the run %s was trained with the %r objective (not adversarially); RiFT "
                "assumes an adversarially trained model, MRC and α* will not mean much",
                self.run,
                self.exp.train.objective,
            )

    # -- shared facts ------------------------------------------------------------------------
    @property
    def splits(self) -> DataSplits:
        if self._splits is None:
            from fortify.data import load_from_config

            self._splits = load_from_config(self.exp.data)
        return self._splits

    @property
    def eps(self) -> float:
        """L∞ budget of the attacks: option, else the run's training ε, else the dataset's."""
        if self.cfg.mrc.attack_eps is not None:
            return float(self.cfg.mrc.attack_eps)
        if self.adversarial:
            return float(self.exp.train.attack.eps)
        return float(self.splits.default_eps)

    def step_dir(self, step: str) -> Path:
        return self.out / step

    def done(self, step: str) -> bool:
        return (self.step_dir(step) / "done.json").is_file()

    def settings(self, step: str) -> dict[str, Any]:
        """Everything ``step``'s result depends on (its options and the earlier steps'), as
        JSON values; a finished step is reused only when these are unchanged."""
        c = self.cfg
        if step == "mrc":
            out: dict[str, Any] = {"mrc": asdict(c.mrc), "tag": c.tag, "seed": c.seed}
        elif step == "finetune":
            out = {"module": c.module, "finetune": asdict(c.finetune), "tag": c.tag}
            if c.module == "auto":
                out["after"] = self.settings("mrc")
        elif step == "interpolate":
            out = {"interpolate": asdict(c.interpolate), "after": self.settings("finetune")}
        else:
            out = {"evaluate": asdict(c.evaluate), "after": self.settings("interpolate")}
        return json.loads(json.dumps(out, default=str))

    def _marker(self, step: str) -> dict[str, Any] | None:
        """``step``'s ``done.json``; None (with a warning) when it cannot be read."""
        path = self.step_dir(step) / "done.json"
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            marker, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = f"a JSON {type(marker).__name__}, not an object"
        if isinstance(marker, dict):
            return marker
        log.warning("%s: the done-marker %s is unreadable (%s); the step counts as unfinished and "
                    "is computed again (the marker is replaced when it finishes)", step, path,
                    why)  # fmt: skip
        return None

    def _reuse(self, step: str, force: bool) -> bool:
        """Whether ``step``'s stored result can be reused; says why not when options changed or
        the done-marker is unreadable."""
        if force or not self.done(step):
            return False
        if step in self._reused:  # already announced in this process
            return True
        marker = self._marker(step)
        if marker is None:
            return False
        stored = marker.get("settings")
        current = self.settings(step)
        if stored is None:  # written before settings were recorded
            log.info("%s: reusing %s (its options were not recorded; --force redoes it)",
                     step, self.step_dir(step))  # fmt: skip
        elif stored != current:
            changes = _changes(stored, current)
            log.warning("%s: options changed since %s was computed (%s); redoing the step",
                        step, self.step_dir(step), "; ".join(changes[:6]))  # fmt: skip
            return False
        else:
            log.info("%s: reusing the finished result in %s (same options; --force redoes it)",
                     step, self.step_dir(step))  # fmt: skip
        self._reused.add(step)
        self.reused_steps.add(step)
        return True

    def _stored(self, step: str, force: bool, load: Callable[[], T]) -> T | None:
        """``step``'s finished result read by ``load`` when it can be reused; None when the step
        must be computed — also when a stored file is unreadable (with a warning naming it;
        the new result replaces it)."""
        if not self._reuse(step, force):
            return None
        try:
            return load()
        except _UNREADABLE as exc:
            log.warning("%s: the stored result in %s is unreadable (%s: %s); computing the step "
                        "again (its files are replaced when it finishes)", step,
                        self.step_dir(step), type(exc).__name__, exc)  # fmt: skip
            self._reused.discard(step)
            self.reused_steps.discard(step)
            return None

    def _mark_done(self, step: str, info: dict[str, Any]) -> None:
        self._reused.add(step)  # computed now: later calls in this process reuse it quietly
        info = {**info, "step": step, "settings": self.settings(step)}
        info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(
            self.step_dir(step) / "done.json", json.dumps(info, indent=2, default=str)
        )

    def _val(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.splits.val.head(n).floats(self.device)

    # -- step 1 ------------------------------------------------------------------------------
    def mrc(self, force: bool = False) -> Any:
        """Compute (or load) the MRC report."""
        from fortify.rift.mrc import build_adversarial_set, compute_mrc
        from fortify.rift.mrc_report import MRCReport, plot_mrc

        d = self.step_dir("mrc")
        stored = self._stored("mrc", force, lambda: MRCReport.load(d))
        if stored is not None:
            return stored
        o = self.cfg.mrc
        x, y = self._val(o.n_points)
        if len(x) == 0:
            raise ConfigError("the run's dataset has an empty validation split; MRC needs one")
        log.info("mrc: PGD-%d (ε=%.4g) on %d validation images", o.attack_steps, self.eps, len(x))
        x_adv = build_adversarial_set(
            self.model,
            x,
            y,
            eps=self.eps,
            steps=o.attack_steps,
            batch_size=o.batch_size,
            seed=self.cfg.seed,
        )
        report = compute_mrc(self.model, x_adv, y, options=o)
        report.extra.update(attack_eps=self.eps, attack_steps=o.attack_steps, split="validation")
        report.save(d)
        chosen = self.choose(report)[0] if self.cfg.module == "auto" else self.cfg.module
        plot_mrc(report, d / "mrc.png", chosen=chosen)  # the module fine-tuned, highlighted
        self._mark_done("mrc", {"options": asdict(o)})
        return report

    # -- step 2 ------------------------------------------------------------------------------
    def choose(self, report: Any) -> tuple[str, str]:
        from fortify.rift.mrc import get_weight
        from fortify.rift.select import choose_module

        if self.cfg.module == "auto":
            return choose_module(report, self.exp.model.name)
        get_weight(self.model, self.cfg.module)
        return self.cfg.module, f"module {self.cfg.module} given by the user"

    def finetune(self, force: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        from fortify.rift.finetune import finetune, save_summary
        from fortify.runs import load_model

        d = self.step_dir("finetune")

        def load() -> tuple[nn.Module, dict[str, Any]]:
            summary = _json_object(d / "finetune.json")
            if not isinstance(summary.get("module"), str):
                raise ValueError(f"{d / 'finetune.json'} names no fine-tuned module")
            model, _ = load_model(d, tag="best", device=self.device)
            return model, summary

        stored = self._stored("finetune", force, load)
        if stored is not None:
            return stored
        if self.cfg.module == "auto":
            name, reason = self.choose(self.mrc())
        else:
            name, reason = self.choose(None)
        log.info("finetune: %s", reason)
        mode: Mode = "new"
        if d.is_dir() and any(d.iterdir()):
            last = d / "checkpoints" / "last.safetensors"
            changed = self.done("finetune")  # finished with other options (or an unreadable
            # marker): start over, the old folder moved aside
            mode = "resume" if last.is_file() and not force and not changed else "overwrite"
        model, summary = finetune(
            self.model, self.exp, name, d, self.cfg.finetune, splits=self.splits, mode=mode
        )
        summary["reason"] = reason
        save_summary(summary, d / "finetune.json")
        self._mark_done("finetune", {"module": name})
        return model, summary

    # -- step 3 ------------------------------------------------------------------------------
    def interpolate(self, force: bool = False) -> dict[str, Any]:
        from fortify.rift.interpolate import (
            alpha_grid,
            evaluate_grid,
            interpolate_state,
            save_grid,
            select_alpha,
        )
        from fortify.runs import save_checkpoint

        d = self.step_dir("interpolate")

        def load() -> dict[str, Any]:
            grid = _json_object(d / "grid.json")
            fields = {"alpha", "clean", "robust"}  # what evaluate and the CLI read
            if not all(fields <= set(p) for p in [grid["chosen"], *grid["points"]]):
                raise ValueError(f"{d / 'grid.json'} lacks the α, clean or robust of a point")
            self.rift_module()  # the chosen model's checkpoint is there and names its module
            return grid

        stored = self._stored("interpolate", force, load)
        if stored is not None:
            return stored
        ft_model, summary = self.finetune()
        o = self.cfg.interpolate
        sd_at = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        sd_ft = ft_model.state_dict()
        x, y = self._val(o.n_points)
        points = evaluate_grid(
            self.model,
            sd_at,
            sd_ft,
            x,
            y,
            eps=self.eps,
            alphas=alpha_grid(o.step),
            steps=o.attack_steps,
            batch_size=o.batch_size,
            seed=self.cfg.seed,
        )
        chosen, reason = select_alpha(
            points, o.tolerance, rule=o.rule, level=o.level, resamples=o.resamples,
            seed=self.cfg.seed,
        )  # fmt: skip
        log.info("interpolate: %s", reason)
        rule = {"rule": o.rule, "tolerance": o.tolerance, "level": o.level, "n_points": len(x)}
        rule["eps"] = self.eps
        save_grid(points, chosen, reason, d, rule=rule)
        model = self._copy_with(interpolate_state(sd_at, sd_ft, chosen.alpha))
        meta = {
            "config": self.meta["config"],
            "num_classes": self.meta["num_classes"],
            "image_shape": self.meta["image_shape"],
            "rift": {"alpha": chosen.alpha, "module": summary["module"], "reason": reason},
        }
        save_checkpoint(d / "rift.safetensors", model, meta)
        self._mark_done("interpolate", {"alpha": chosen.alpha})
        return json.loads((d / "grid.json").read_text())

    def _copy_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        import copy

        m = copy.deepcopy(self.model)
        m.load_state_dict(state)
        return m.eval()

    def rift_model(self) -> nn.Module:
        """The interpolated model chosen by step 3."""
        from fortify.runs import load_checkpoint

        m = self._copy_with(self.model.state_dict())
        load_checkpoint(self.step_dir("interpolate") / "rift.safetensors", m)
        return m.eval()

    def rift_module(self) -> str:
        """The module fine-tuned for the model of step 3 (recorded in its checkpoint)."""
        from fortify.runs.checkpoint import read_sidecar

        return str(
            read_sidecar(self.step_dir("interpolate") / "rift.safetensors")["rift"]["module"]
        )

    # -- step 4 ------------------------------------------------------------------------------
    def evaluate(self, force: bool = False) -> dict[str, Any]:
        d = self.step_dir("evaluate")

        def load() -> dict[str, Any]:
            summary = _json_object(d / "summary.json")
            summary_markdown(summary)  # what the caller prints: raises if fields are missing
            return summary

        stored = self._stored("evaluate", force, load)
        if stored is not None:
            return stored
        grid = self.interpolate()
        models = {"AT": self.model, "RiFT": self.rift_model()}
        summary = evaluate_models(
            models,
            self.splits,
            eps=self.eps,
            opts=self.cfg.evaluate,
            seed=self.cfg.seed,
            out_dir=d,
            data_root=self.exp.data.root,
            reuse=not force,
        )
        summary["alpha"] = grid["chosen"]["alpha"]
        summary["module"] = self.rift_module()
        atomic_write_text(d / "summary.json", json.dumps(summary, indent=2))
        atomic_write_text(d / "summary.md", summary_markdown(summary))
        self._mark_done("evaluate", {})
        return summary

    def run_all(self, force: bool = False) -> dict[str, Any]:
        """Every step; finished steps are skipped unless ``force``."""
        self.mrc(force=force)
        self.finetune(force=force)
        self.interpolate(force=force)
        return self.evaluate(force=force)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored at ``path`` (ValueError when it is another JSON value)."""
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_step(step: str) -> str:
    if step not in STEPS:
        raise FortifyError(f"unknown RiFT step {step!r}; steps: {', '.join(STEPS)}")
    return step
