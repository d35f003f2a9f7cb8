"""Analyses of defended models: cost (parameters, FLOPs), FSR feature analysis, mask plots.

- :mod:`fortify.analysis.cost`     — ``cost_report(model, input_shape)``
- :mod:`fortify.analysis.features` — ``feature_analysis(model, x, y, x_mem, y_mem, ...)``
- :mod:`fortify.analysis.masks`    — ``plot_masks(model, x, x_adv, y, path)``
"""

from fortify.analysis.cost import CostReport, cost_report, count_flops, count_params

__all__ = ["CostReport", "cost_report", "count_flops", "count_params"]
