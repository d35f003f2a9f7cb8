"""Robustness evaluation: attack suites, honest-evaluation checks, reports and plots.

``evaluate(model, x, y, suite="paper", eps=8/255)`` works on any ``nn.Module`` mapping images
in [0, 1] (N, C, H, W) to logits and returns an :class:`EvalReport`
(``to_markdown()``, ``to_json()``, ``save(dir)``). Suites live in a registry
(``register_suite(name, fn, options=...)``); built-ins: ``paper``, ``autoattack``, ``quick``,
``full``, ``pgd10``, ``adaptive``, ``ood``. Suite options go in
``evaluate(..., suite_options={...})``. One file per job: :mod:`~fortify.evaluate.registry`
(suites by name), :mod:`~fortify.evaluate.context` (:class:`SuiteContext`),
:mod:`~fortify.evaluate.driver` (:func:`evaluate`), :mod:`~fortify.evaluate.suites` (built-in
suites), :mod:`~fortify.evaluate.autoattack` (the one pyautoattack adapter),
:mod:`~fortify.evaluate.checks`, :mod:`~fortify.evaluate.report`, :mod:`~fortify.evaluate.plot`.
``compare_reports(a, b)`` compares two reports on the same points (B − A per column with a
paired-bootstrap CI, McNemar p-value and verdict).
See docs/evaluation.md for the semantics of ``mode="final"`` / ``"best"`` and of every check.
"""

from fortify.evaluate.compare import Comparison, compare_reports
from fortify.evaluate.context import SuiteContext
from fortify.evaluate.driver import evaluate, evaluate_split
from fortify.evaluate.outcome import Check, Outcome, ensemble_of, worst_case
from fortify.evaluate.plot import eps_curve, plot_eps_curve
from fortify.evaluate.registry import (
    available_suites,
    eval_config_options,
    get_suite,
    register_suite,
)
from fortify.evaluate.report import EvalReport, side_by_side

# Importing the suite modules registers every built-in suite.
from fortify.evaluate import suites, adaptive, ood  # noqa: E402,F401  isort: skip

__all__ = [
    "Check",
    "Comparison",
    "EvalReport",
    "Outcome",
    "SuiteContext",
    "available_suites",
    "compare_reports",
    "ensemble_of",
    "eps_curve",
    "eval_config_options",
    "evaluate",
    "evaluate_split",
    "get_suite",
    "plot_eps_curve",
    "register_suite",
    "side_by_side",
    "worst_case",
]
