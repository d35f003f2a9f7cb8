"""Objectives: each loss equals a direct hand computation on a fixed batch; inner attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.config import TrainConfig, from_dict
from fortify.data import load_dataset
from fortify.defenses import attach
from fortify.defenses.contract import CaptureMixin
from fortify.errors import FortifyError
from fortify.models import create
from fortify.train import AdvBatch, StepContext, available_objectives, get_objective

EPS = 0.1


@pytest.fixture(scope="module")
def batch():
    splits = load_dataset("digits", val_size=300)
    x, y = splits.train.subset(slice(0, 32)).floats()
    return x, y


def _model(seed: int = 0) -> nn.Module:
    """A small CNN whose BN statistics and sharpened head give confident, input-dependent
    predictions (a freshly initialised net is nearly uniform, which would hide KL terms)."""
    torch.manual_seed(seed)
    model = create("small-cnn", 10, 1, width=6)
    splits = load_dataset("digits", val_size=300)
    x, _ = splits.train.subset(slice(0, 256)).floats()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the data statistics
    with torch.no_grad():
        model.train()(x)
        model.linear.weight.mul_(10.0)
    return model


def _cfg(**train) -> TrainConfig:
    base = {"attack": {"eps": EPS, "step_size": EPS / 4, "steps": 5}}
    base.update(train)
    return from_dict(TrainConfig, base)


def _ctx(model: nn.Module, cfg: TrainConfig, seed: int = 0) -> StepContext:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    return StepContext(
        cfg=cfg, optimizer=opt, device=torch.device("cpu"), params=params, module=model,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _fixed_adv(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    return (x + delta).clamp(0, 1)


def _probs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return F.softmax(model(x).double(), 1).numpy()


def test_registry_lists_builtin_objectives_and_rejects_unknown():
    assert {"standard", "at", "trades", "mart"} <= set(available_objectives())
    with pytest.raises(FortifyError, match="unknown objective 'trade'.*trades"):
        get_objective("trade")


def test_standard_loss_is_clean_cross_entropy(batch):
    x, y = batch
    model = _model().eval()
    obj = get_objective("standard", _cfg())
    loss, metrics = obj.loss(model, x, y, _ctx(model, obj.cfg))
    p = _probs(model, x)
    hand = -np.mean(np.log(p[np.arange(len(y)), y.numpy()]))
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(hand, rel=1e-5)


def test_at_loss_is_cross_entropy_on_adversarial_batch(batch):
    x, y = batch
    model = _model().eval()
    obj = get_objective("at", _cfg())
    x_adv = _fixed_adv(x)
    loss, metrics = obj.compute(model, AdvBatch(x, y, x_adv), _ctx(model, obj.cfg))
    p = _probs(model, x_adv)
    hand = -np.mean(np.log(p[np.arange(len(y)), y.numpy()]))
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert metrics["acc_adv"].item() == pytest.approx(np.mean(p.argmax(1) == y.numpy()))


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_loss_matches_hand_computation(batch, beta):
    x, y = batch
    model = _model().eval()
    obj = get_objective("trades", _cfg(beta=beta))
    x_adv = _fixed_adv(x)
    loss, metrics = obj.compute(model, AdvBatch(x, y, x_adv), _ctx(model, obj.cfg))
    pc, pa = _probs(model, x), _probs(model, x_adv)
    idx = np.arange(len(y)), y.numpy()
    ce = -np.mean(np.log(pc[idx]))
    kl = np.mean(np.sum(pc * (np.log(pc) - np.log(pa)), axis=1))
    assert kl > 0.005
    assert loss.item() == pytest.approx(ce + beta * kl, rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-4)


def test_mart_loss_matches_hand_computation(batch):
    x, y = batch
    model = _model().eval()
    obj = get_objective("mart", _cfg(beta=6.0))
    x_adv = _fixed_adv(x)
    loss, _ = obj.compute(model, AdvBatch(x, y, x_adv), _ctx(model, obj.cfg))
    pc, pa = _probs(model, x), _probs(model, x_adv)
    total = 0.0
    for i, label in enumerate(y.tolist()):  # per-sample, straight from the MART equations
        others = [pa[i, k] for k in range(pa.shape[1]) if k != label]
        bce = -math.log(pa[i, label]) - math.log(1.0001 - max(others))  # the release's 1.0001
        kl = sum(pc[i, k] * math.log(pc[i, k] / pa[i, k]) for k in range(pc.shape[1]))
        total += bce + 6.0 * kl * (1 - pc[i, label])
    assert loss.item() == pytest.approx(total / len(y), rel=1e-5)


@pytest.mark.parametrize("name", ["at", "trades", "mart"])
def test_inner_attack_stays_in_ball_raises_loss_and_restores_mode(batch, name):
    x, y = batch
    model = _model().train()
    obj = get_objective(name, _cfg())
    ctx = _ctx(model, obj.cfg)
    bn = model.features[0][1]
    stats = bn.running_mean.clone()
    x_adv = obj.perturb(model, x, y, ctx)
    assert model.training and bn.training, "crafting must restore training mode"
    assert torch.equal(bn.running_mean, stats), "bn_mode=eval crafting must not touch BN stats"
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        ce_clean = F.cross_entropy(model(x), y).item()
        ce_adv = F.cross_entropy(model(x_adv), y).item()
    assert ce_adv > ce_clean + 0.05


def test_fgsm_rs_takes_one_step_from_random_start(batch):
    x, y = batch
    model = _model()
    cfg = _cfg(attack={"kind": "fgsm-rs", "eps": EPS, "step_size": 1.25 * EPS, "steps": 1})
    obj = get_objective("at", cfg)
    x_adv = obj.perturb(model, x, y, _ctx(model, cfg))
    interior = (x > EPS) & (x < 1 - EPS)
    delta = (x_adv - x)[interior]
    assert delta.abs().max() <= EPS + 1e-6
    assert (delta.abs() > EPS - 1e-6).float().mean() > 0.3  # many coordinates clipped at ±ε


def test_bn_mode_train_updates_bn_statistics_while_crafting(batch):
    x, y = batch
    model = _model().train()
    cfg = _cfg(attack={"eps": EPS, "step_size": EPS / 4, "steps": 2, "bn_mode": "train"})
    bn = model.features[0][1]
    stats = bn.running_mean.clone()
    get_objective("at", cfg).perturb(model, x, y, _ctx(model, cfg))
    assert not torch.equal(bn.running_mean, stats)


class ToyDefence(CaptureMixin, nn.Module):
    """Per-channel scale after a layer; aux loss pulls the mean feature towards 1."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape[0], 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        out = f * self.scale
        self.record(out=out)
        return out

    def aux_losses(self, ctx):
        return {"toy_aux": 0.5 * (self.recorded["out"].mean() - 1.0) ** 2}


def test_aux_losses_are_added_and_logged(batch):
    x, y = batch
    model = attach(_model(), ToyDefence, at="features.0", input_shape=(1, 8, 8)).eval()
    obj = get_objective("at", _cfg())
    x_adv = _fixed_adv(x)
    loss, metrics = obj.compute(model, AdvBatch(x, y, x_adv), _ctx(model, obj.cfg))
    with torch.no_grad():
        ce = F.cross_entropy(model(x_adv), y).item()
        feat = model.features[0](x_adv)  # the hook applies the defence
        aux = 0.5 * (feat.mean().item() - 1.0) ** 2
    assert aux > 1e-4
    assert metrics["toy_aux"].item() == pytest.approx(aux, rel=1e-4)
    assert loss.item() == pytest.approx(ce + aux, rel=1e-5)


def test_models_without_providers_report_no_aux_terms(batch):
    x, y = batch
    model = _model().eval()
    obj = get_objective("trades", _cfg())
    _, metrics = obj.compute(model, AdvBatch(x, y, _fixed_adv(x)), _ctx(model, obj.cfg))
    assert set(metrics) == {"ce", "kl", "acc", "acc_adv", "loss"}


def test_step_updates_only_the_given_parameter_subset(batch):
    x, y = batch
    model = _model()
    cfg = _cfg()
    ctx = _ctx(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    ctx.step(loss, params=[model.linear.weight])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"linear.weight"}


def test_step_refuses_non_finite_loss(batch):
    model = _model()
    ctx = _ctx(model, _cfg())
    from fortify.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="nan"):
        ctx.step(torch.tensor(float("nan"), requires_grad=True))


def _first_crafting_input(name: str, batch, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, the input of the model's first forward while ``name`` crafts x_adv)."""
    x, y = batch
    model = _model().train()
    obj = get_objective(name, _cfg(options=options))
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    try:
        obj.perturb(model, x, y, _ctx(model, obj.cfg))
    finally:
        handle.remove()
    return x, seen[0]


def test_mart_inner_attack_starts_from_the_release_gaussian(batch):
    """Default MART start = x + 0.001·N(0, 1) (the release): on pixels away from the [0, 1]
    box the start's offsets pass a normality test with σ ≈ 0.001."""
    from scipy import stats

    x, start = _first_crafting_input("mart", batch)
    interior = (x > 0.01) & (x < 0.99)
    delta = (start - x)[interior].double()
    assert delta.numel() > 500
    assert abs(delta.mean().item()) < 5e-5
    assert delta.std().item() == pytest.approx(0.001, rel=0.1)
    assert stats.kstest((delta / 0.001).numpy(), "norm").pvalue > 0.01
    # σ is the option mart_init
    x, start = _first_crafting_input("mart", batch, mart_init=0.004)
    assert (start - x)[interior].double().std().item() == pytest.approx(0.004, rel=0.1)


def test_mart_uniform_start_is_the_labelled_option(batch):
    x, start = _first_crafting_input("mart", batch, mart_start="uniform")
    interior = (x > EPS) & (x < 1 - EPS)
    delta = (start - x)[interior].double()
    assert delta.abs().max().item() <= EPS + 1e-6
    # uniform on [-ε, ε]: std ε/√3, far from the Gaussian start's 0.001
    assert delta.std().item() == pytest.approx(EPS / math.sqrt(3), rel=0.1)


def test_mart_options_are_checked():
    with pytest.raises(FortifyError, match="mart_start='box'.*gaussian.*uniform"):
        get_objective("mart", _cfg(options={"mart_start": "box"}))
    with pytest.raises(
        FortifyError, match=r"mart_init \(σ of the Gaussian start.*must be a finite number >= 0"
    ):
        get_objective("mart", _cfg(options={"mart_init": -1}))
    with pytest.raises(FortifyError, match="unknown train.options.*mart_sigma"):
        get_objective("mart", _cfg(options={"mart_sigma": 0.1}))


def test_an_objective_with_the_former_compute_signature_is_refused_clearly():
    from fortify.train import Objective

    with pytest.raises(TypeError, match=r"AdvBatch\(x, y, x_adv\)"):

        class Former(Objective):  # noqa: F841 - defining the class is the test
            def compute(self, model, x, y, x_adv, ctx):
                raise AssertionError("never called")
