"""Parameter and FLOP counts of a model with and without its attached defences.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
**2 FLOPs per multiply-add** for convolutions and matrix products and ignores BN, activations,
pooling and other element-wise work. Under this convention a CIFAR ResNet-18 (32×32) is ≈1.11
GFLOPs, the figure the FSR paper reports (Table 7); tools that count multiply-adds (MACs, e.g.
``thop``) report half of it. PyTorch's CPU fused attention kernel (used by FD's Gaussian
non-local blocks) has no formula in the counter; this module registers one for its forward and
its backward (the same counts as for the other fused attention kernels, as executed: the two
matrix products of the forward; the five of the gradient, the scores recomputed included).
:func:`count_call_flops` counts a whole training step, backward included.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fortify.attacks.inputs import first_forward
from fortify.defenses.attach import DEFENSES_ATTR, attached, infer_feature_shapes
from fortify.models import count_parameters
from fortify.utils.shapes import as_chw

log = logging.getLogger(__name__)

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_FLASH not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_FLASH)
    def _cpu_flash_flops(
        query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
    ) -> int:
        """(B, H, S_q, D) x (B, H, S_k, D) → 2·B·H·S_q·S_k·(D_qk + D_v)."""
        flops: int = flop_counter.sdpa_flop_count(  # type: ignore[no-untyped-call]
            query_shape, key_shape, value_shape
        )
        return flops


_CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if _CPU_FLASH_BACKWARD not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_FLASH_BACKWARD)
    def _cpu_flash_backward_flops(
        grad_out_shape: Any,
        query_shape: Any,
        key_shape: Any,
        value_shape: Any,
        *args: Any,
        **kwargs: Any,
    ) -> int:
        """The five matrix products of the fused attention gradient, as the counter does for
        the other fused kernels: the recomputed scores QKᵀ, then dP, dV, dQ, dK."""
        flops: int = flop_counter.sdpa_backward_flop_count(  # type: ignore[no-untyped-call]
            grad_out_shape, query_shape, key_shape, value_shape
        )
        return flops


__all__ = [
    "CostReport",
    "cost_report",
    "cost_table",
    "call_flops_by_op",
    "count_call_flops",
    "count_flops",
    "count_params",
]


def count_params(model: nn.Module, *, include_defences: bool = True) -> int:
    """Number of parameter elements (shared parameters once).

    With ``include_defences=False`` parameters under ``fortify_defenses`` are skipped, giving
    the backbone's count.
    """
    exclude: tuple[str, ...] = ()
    if not include_defences:
        exclude = tuple(
            name for name, _ in model.named_modules() if name.split(".")[-1] == DEFENSES_ATTR
        )
    return count_parameters(model, exclude)


def count_flops(module: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass of ``module`` on ``inputs``.

    Raises:
        DataError: ``module`` cannot take inputs of this shape (e.g. an image smaller than its
            kernels); EvaluationError: its forward fails otherwise.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            first_forward(module, inputs)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


class _FlopsByOp(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sums the counter's formulas per op over every op dispatched (no module tracking: unlike
    :class:`FlopCounterMode` it works under ``torch.autograd.grad``). A composite op without a
    formula (as under ``torch.inference_mode``) is decomposed so its parts are counted."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.flops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is None:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.flops[str(func._overloadpacket)] += int(formula(*args, **kwargs, out_val=out))
        return out


def call_flops_by_op(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of everything ``fn()`` executes, backward passes included,
    per ATen op name (e.g. ``"aten.convolution"``)."""
    with _FlopsByOp() as counter:
        fn()
    return dict(counter.flops)


def count_call_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of everything ``fn()`` executes, backward passes included
    (e.g. one adversarial-training step: the inner attack's input gradients and the update)."""
    return sum(call_flops_by_op(fn).values())


@dataclass
class CostReport:
    """Per-image cost of a model; ``*_backbone`` excludes every attached defence."""

    input_shape: tuple[int, int, int]
    params_total: int
    params_backbone: int
    flops_total: int
    flops_backbone: int
    flops_defences: dict[str, int]
    convention: str = "FLOPs = 2 x multiply-adds (torch.utils.flop_counter); BN/ReLU not counted"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A small Markdown table (millions of parameters, GFLOPs)."""
        rows = [
            "| model | params (M) | GFLOPs |",
            "|---|---|---|",
            f"| backbone | {self.params_backbone / 1e6:.2f} | {self.flops_backbone / 1e9:.4f} |",
            f"| + defences | {self.params_total / 1e6:.2f} | {self.flops_total / 1e9:.4f} |",
        ]
        return "\n".join(rows) + f"\n\n{self.convention}; input {self.input_shape}, batch 1."


def cost_report(model: nn.Module, input_shape: tuple[int, int, int]) -> CostReport:
    """Parameters and FLOPs of ``model`` for one image of shape ``input_shape`` (C, H, W).

    The defences' FLOPs are measured by running each attached defence on its own feature shape
    (as in eval mode: FSR's auxiliary head does not run); the backbone's FLOPs are the total
    minus those.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    total = count_flops(model, x)
    defences = attached(model)
    shapes = infer_feature_shapes(model, list(defences), input_shape) if defences else {}
    per_defence = {}
    for name, module in defences.items():
        per_defence[name] = count_flops(module, torch.zeros(1, *shapes[name], device=device))
    return CostReport(
        input_shape=as_chw(input_shape),
        params_total=count_params(model),
        params_backbone=count_params(model, include_defences=False),
        flops_total=total,
        flops_backbone=total - sum(per_defence.values()),
        flops_defences=per_defence,
    )


def cost_table(models: dict[str, nn.Module], input_shape: tuple[int, int, int]) -> str:
    """A Table-7-style Markdown comparison of several defended versions of one backbone.

    Args:
        models: row label -> model (e.g. ``{"AT+FSR": ..., "AT+CAS": ...}``); the first model's
            backbone (defences excluded) is the reference row.
        input_shape: (C, H, W) of one image; costs are per image.
    Returns: the table, with parameters in millions, GFLOPs and each row's FLOP ratio to the
    backbone (the expected training-step time ratio when compute-bound).
    """
    if not models:
        raise ValueError("cost_table needs at least one model")
    reports = {label: cost_report(m, input_shape) for label, m in models.items()}
    ref = next(iter(reports.values()))
    rows = [
        "| model | params (M) | +params (M) | GFLOPs | +GFLOPs | FLOP ratio |",
        "|---|---|---|---|---|---|",
        f"| backbone | {ref.params_backbone / 1e6:.2f} | 0 | {ref.flops_backbone / 1e9:.4f} | 0 "
        "| 1.000 |",
    ]
    for label, r in reports.items():
        if r.params_backbone != ref.params_backbone or r.flops_backbone != ref.flops_backbone:
            log.warning("%s has a different backbone from the first model's", label)
        dp = r.params_total - r.params_backbone
        df = r.flops_total - r.flops_backbone
        rows.append(
            f"| {label} | {r.params_total / 1e6:.2f} | {dp / 1e6:.2f} | {r.flops_total / 1e9:.4f}"
            f" | {df / 1e9:.4f} | {r.flops_total / ref.flops_backbone:.3f} |"
        )
    return "\n".join(rows) + f"\n\n{ref.convention}; input {tuple(input_shape)}, batch 1."
