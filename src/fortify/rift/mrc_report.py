"""The results of MRC (:mod:`fortify.rift.mrc`): :class:`ModuleMRC` per module, the
:class:`MRCReport` of a whole model (ranking, JSON, Markdown table) and its bar chart
(:func:`plot_mrc`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fortify.errors import ConfigError, DataError, FortifyError
from fortify.utils.atomic import atomic_write_text, atomic_write_with


@dataclass
class ModuleMRC:
    """MRC of one module.

    Attributes:
        name: module name (``layer2.1.conv2``); index: position in module order (depth).
        mrc: max robust loss found − baseline loss (nats, ≥ 0).
        baseline_loss / max_loss: robust CE at W₀ / at the maximiser.
        baseline_acc / acc_at_max: accuracy (percent) on the adversarial set at W₀ / maximiser.
        acc_drop: baseline_acc − acc_at_max (percentage points).
        rel_norm: ‖ΔW‖/‖W₀‖ of the maximiser (verified ≤ ε within 1e-5 relative).
        best_pass: pass after which the maximum was seen (0 = W₀ itself).
        passes_run: passes executed; projected_at: first pass that needed a projection (or None).
        numel: number of weight entries.
    """

    name: str
    index: int
    mrc: float
    baseline_loss: float
    max_loss: float
    baseline_acc: float
    acc_at_max: float
    acc_drop: float
    rel_norm: float
    best_pass: int
    passes_run: int
    projected_at: int | None
    numel: int


@dataclass
class MRCReport:
    """MRC of every module plus the settings used; ``modules`` are in depth order."""

    modules: list[ModuleMRC]
    eps: float
    passes: int
    lr: float
    batch_size: int
    variant: str
    n_points: int
    baseline_loss: float
    baseline_acc: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def sorted(self) -> list[ModuleMRC]:
        """Modules from least to most robust-critical."""
        return sorted(self.modules, key=lambda m: (m.mrc, m.index))

    def get(self, name: str) -> ModuleMRC:
        for m in self.modules:
            if m.name == name:
                return m
        raise ConfigError(
            f"module {name!r} has no MRC in this report; known: "
            f"{', '.join(m.name for m in self.modules)}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranking"] = [m.name for m in self.sorted()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MRCReport:
        d = dict(d)
        d.pop("ranking", None)
        d["modules"] = [ModuleMRC(**m) for m in d["modules"]]
        return cls(**d)

    def table(self) -> str:
        """Markdown table sorted by MRC (least critical first)."""
        lines = [
            f"MRC (ε = {self.eps} relative, {self.passes} passes, lr {self.lr}, variant "
            f"{self.variant}) on {self.n_points} fixed adversarial validation points; baseline "
            f"robust loss {self.baseline_loss:.4f}, robust acc {self.baseline_acc:.2f}%",
            "",
            "| rank | module | depth | MRC | robust-acc drop (pts) | ‖ΔW‖/‖W‖ | best pass |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for rank, m in enumerate(self.sorted(), 1):
            lines.append(
                f"| {rank} | {m.name} | {m.index} | {m.mrc:.4f} | {m.acc_drop:.2f} | "
                f"{m.rel_norm:.4f} | {m.best_pass} |"
            )
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> None:
        """Write ``mrc.json``, ``mrc.md`` and the bar chart ``mrc.png`` into ``out_dir``."""
        out = Path(out_dir)
        atomic_write_text(out / "mrc.json", json.dumps(self.to_dict(), indent=2))
        atomic_write_text(out / "mrc.md", self.table() + "\n")
        plot_mrc(self, out / "mrc.png")

    @classmethod
    def load(cls, out_dir: str | Path) -> MRCReport:
        path = Path(out_dir) / "mrc.json"
        if not path.is_file():
            raise FortifyError(f"no MRC report at {str(path)!r}; run `fortify rift mrc` first")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DataError(
                f"the MRC report {str(path)!r} is unreadable ({what}); compute it again with "
                "`fortify rift mrc RUN --force`"
            ) from None


def plot_mrc(report: MRCReport, path: str | Path, chosen: str | None = None) -> None:
    """Bar chart of MRC over network depth (module order), robust-accuracy drop as a line on a
    second axis; both axes start at 0, the ``chosen`` module's bar is highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    mods = report.modules
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(mods) + 2), 4.4))
    pos = list(range(len(mods)))
    colors = ["tab:orange" if m.name == chosen else "tab:blue" for m in mods]
    ax.bar(pos, [m.mrc for m in mods], color=colors)
    ax.set_ylabel("MRC (rise of robust CE, nats)")
    ax.set_xticks(pos)
    ax.set_xticklabels([m.name for m in mods], rotation=90, fontsize=7)
    ax2 = ax.twinx()
    (line,) = ax2.plot(pos, [m.acc_drop for m in mods], "o-", color="tab:red", ms=3)
    ax2.set_ylabel("robust-accuracy drop at the maximiser (points)")
    ax.set_ylim(bottom=0, top=max([m.mrc for m in mods] + [1e-6]) * 1.1)
    ax2.set_ylim(bottom=min(0.0, *[m.acc_drop for m in mods]) if mods else 0.0)
    ax2.set_ylim(top=max([m.acc_drop for m in mods] + [1e-6]) * 1.1)
    handles = [Patch(color="tab:blue", label="MRC (bars, left axis)"), line]
    line.set_label("accuracy drop (line, right axis)")
    if chosen is not None:
        handles.insert(1, Patch(color="tab:orange", label=f"chosen: {chosen}"))
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    attack_eps = report.extra.get("attack_eps")
    attack = f"PGD-{report.extra.get('attack_steps', 10)}"
    if attack_eps is not None:
        attack += f" L∞ ε={float(attack_eps):.3g}"
    ax.set_title(  # two lines: one would be clipped at the figure's edges
        f"Module robust criticality — {attack} set, n={report.n_points}\n"
        f"weight radius {report.eps:g}·‖W‖, {report.passes} passes, lr {report.lr:g}, "
        f"{report.variant}",
        fontsize=9,
    )
    fig.tight_layout()

    def write(tmp: Path) -> None:  # bbox "tight": long module names stay whole
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    try:
        atomic_write_with(path, write)
    finally:
        plt.close(fig)
