"""Automatic choice of the module to fine-tune (``--module auto``).

Rule: the lowest-MRC module among the *middle* of the network, because the authors advise
middle layers among the low-MRC ones (the first convolution sees raw pixels, the last stage and
the classifier carry most of the robust features, and both have tiny or huge MRC outliers):

* models with ≥ 4 residual stages (ResNets ``layer1..layer4``): modules in stages 2 … n−1
  (``layer2``, ``layer3``);
* models with 3 stages (WRN ``block1..block3``): stages 1 … n−1 (``block1``, ``block2``; the
  authors' WRN choices are in ``block1``);
* models without stages (small-cnn, VGG, …): every weight module except the first and the last
  (the stem convolution and the classifier).

1×1 projection shortcuts (``shortcut``, ``downsample``, ``convShortcut``) are skipped: they hold
few weights and the authors never picked one. Stages come from the model registry
(``fortify.models.spec(name).stages``) or, failing that, from top-level module names
``layer<k>`` / ``block<k>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fortify.errors import ConfigError
from fortify.rift.mrc_report import MRCReport

_SHORTCUT = re.compile(r"(^|\.)(shortcut|downsample|convShortcut)(\.|$)")
_STAGE = re.compile(r"^(?:net\.)?((?:layer|block)\d+)(?:\.|$)")


def detect_stages(module_names: Sequence[str], model_name: str | None = None) -> list[str]:
    """Stage names, shallow to deep, from the registry entry of ``model_name`` or module names."""
    if model_name:
        try:
            from fortify.models import spec

            stages = list(spec(model_name).stages)
            if stages:
                return stages
        except Exception:  # unknown/unregistered model: fall back to the names
            pass
    seen: list[str] = []
    for n in module_names:
        m = _STAGE.match(n)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def _stage_of(name: str, stages: Sequence[str]) -> str | None:
    bare = name[4:] if name.startswith("net.") else name
    for s in stages:
        if bare == s or bare.startswith(s + "."):
            return s
    return None


def middle_modules(
    module_names: Sequence[str], model_name: str | None = None
) -> tuple[list[str], str]:
    """Candidate modules for ``auto`` (in depth order) and a description of the rule applied."""
    names = list(module_names)
    stages = detect_stages(names, model_name)
    if len(stages) >= 4:
        keep = stages[1:-1]
        rule = f"modules in the middle stages {', '.join(keep)}"
    elif len(stages) == 3:
        keep = stages[:-1]
        rule = f"modules in stages {', '.join(keep)} (all but the last)"
    else:
        keep = []
        rule = "all weight modules except the first (stem) and the last (classifier)"
    if keep:
        cands = [n for n in names if _stage_of(n, stages) in keep]
    else:
        cands = names[1:-1]
    cands = [n for n in cands if not _SHORTCUT.search(n)]
    return cands, rule + ", without 1×1 projection shortcuts"


def choose_module(report: MRCReport, model_name: str | None = None) -> tuple[str, str]:
    """Pick the lowest-MRC middle module from ``report``; returns (name, human-readable reason)."""
    names = [m.name for m in report.modules]
    cands, rule = middle_modules(names, model_name)
    if not cands:
        if not names:
            raise ConfigError("the MRC report lists no modules; cannot choose one automatically")
        cands, rule = names, "all scored modules (the network is too shallow for the middle rule)"
    scored = sorted((report.get(n) for n in cands), key=lambda m: (m.mrc, m.index))
    best = scored[0]
    overall = report.sorted()[0]
    reason = (
        f"auto: chose {best.name} (MRC {best.mrc:.4g}, robust-acc drop {best.acc_drop:.2f} pts), "
        f"the lowest MRC among {len(cands)} candidates: {rule}"
    )
    if overall.name != best.name:
        reason += f"; the global minimum {overall.name} (MRC {overall.mrc:.4g}) is outside that set"
    return best.name, reason
