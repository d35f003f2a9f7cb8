"""FSR block: mask numerics, block algebra, losses, ablations, attaching and training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses import AuxContext, capture_aux
from fortify.defenses.fsr import (
    FSR,
    FSRBlock,
    attach_fsr,
    fsr_blocks,
    gumbel_mask,
    wrong_labels,
)
from fortify.errors import ConfigError, FortifyError


def block(**kw) -> FSRBlock:
    torch.manual_seed(0)
    b = FSRBlock(8, 5, hidden=6, **kw)
    # non-trivial BN statistics so eval mode differs from identity-like behaviour
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return b


# ---------------------------------------------------------------- mask numerics


def test_eval_mask_is_sigmoid_r_over_tau():
    r = torch.linspace(-3, 3, 601)
    for tau in (0.1, 0.5, 2.0):
        m = gumbel_mask(r, tau, sample=False)
        torch.testing.assert_close(m, torch.sigmoid(r / tau), atol=1e-6, rtol=0)
        m_rel = gumbel_mask(r, tau, sample=False, eps=1e-8)
        torch.testing.assert_close(m_rel, torch.sigmoid(r / tau), atol=1e-5, rtol=0)


def test_eval_mask_release_eps_matches_softmax_formula():
    """With eps the eval mask equals the release's two-class softmax with u = 0.5 for both."""
    r = torch.randn(1000) * 4
    eps, tau = 1e-8, 0.1
    p = torch.sigmoid(r)
    g = -torch.log(-torch.log(torch.tensor(0.5) + eps) + eps)
    logits = torch.stack([torch.log(p + eps) + g, torch.log(1 - p + eps) + g], dim=0) / (tau + eps)
    expected = torch.softmax(logits, dim=0)[0]
    torch.testing.assert_close(
        gumbel_mask(r, tau, sample=False, eps=eps), expected, atol=1e-6, rtol=0
    )


def test_block_eval_mask_equals_sigmoid_and_is_deterministic():
    b = block().eval()
    f = torch.randn(3, 8, 4, 4)
    p1, p2 = b.parts(f), b.parts(f)
    torch.testing.assert_close(p1.mask, torch.sigmoid(p1.r / b.tau), atol=1e-6, rtol=0)
    assert torch.equal(p1.out, p2.out)


def test_gumbel_samples_in_unit_interval_and_mean_tends_to_sigma():
    torch.manual_seed(1)
    r = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5])
    draws = r.expand(40000, -1)
    for eps in (0.0, 1e-8):
        m = gumbel_mask(draws, 0.1, sample=True, eps=eps)
        assert m.min() >= 0 and m.max() <= 1
        m_cold = gumbel_mask(draws, 1e-3, sample=True, eps=eps)
        # as τ → 0 samples become Bernoulli(σ(r)): their mean tends to σ(r)
        torch.testing.assert_close(m_cold.mean(0), torch.sigmoid(r), atol=0.015, rtol=0)
        assert ((m_cold < 0.01) | (m_cold > 0.99)).float().mean() > 0.99
    # at high temperature the mean is pulled towards 1/2: the limit above is not trivially true
    m_hot = gumbel_mask(draws, 5.0, sample=True).mean(0)
    assert (m_hot - torch.sigmoid(r)).abs().max() > 0.1


def test_training_mask_is_random_eval_not():
    b = block()
    f = torch.randn(2, 8, 4, 4)
    b.train()
    assert not torch.equal(b(f), b(f))
    b.eval()
    assert torch.equal(b(f), b(f))


# ---------------------------------------------------------------- block algebra


def _hand_forward(b: FSRBlock, f: torch.Tensor) -> torch.Tensor:
    s, r_ = b.separation, b.recalibration

    def net(seq, x):  # conv, BN (eval), ReLU, conv, BN, ReLU, conv — written out by hand
        for i in (0, 3):
            bn = seq[i + 1]
            x = F.conv2d(x, seq[i].weight, padding=1)
            x = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(
                bn.running_var[None, :, None, None] + bn.eps
            ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
            x = x.clamp_min(0)
        return F.conv2d(x, seq[6].weight, padding=1)

    r = net(s, f)
    m = 1 / (1 + torch.exp(-r / b.tau))
    f_pos, f_neg = m * f, (1 - m) * f
    f_neg_rec = f_neg + (1 - m) * net(r_, f_neg)
    return f_pos + f_neg_rec


def test_block_output_equals_hand_computation():
    b = block().eval()
    f = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        out = b(f)
        torch.testing.assert_close(out, _hand_forward(b, f), atol=1e-5, rtol=1e-5)
        p = b.parts(f)
        torch.testing.assert_close(p.out, p.f_pos + p.f_neg_rec)
        torch.testing.assert_close(p.f_pos + p.f_neg, f, atol=1e-6, rtol=0)


def test_fsr_alias_and_parameter_layout():
    assert FSR is FSRBlock
    b = FSRBlock(16, 10)
    names = {n for n, _ in b.named_parameters()}
    assert "separation.0.weight" in names and "recalibration.6.weight" in names
    assert "aux.weight" in names and "aux.bias" in names
    assert b.separation[0].weight.shape == (64, 16, 3, 3)  # default hidden width 64
    assert b.separation[0].bias is None and b.separation[6].bias is None


# ---------------------------------------------------------------- losses


def test_wrong_label_rule():
    logits = torch.tensor([[5.0, 3.0, 1.0], [0.0, 2.0, 9.0], [1.0, 4.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    # row 0: top-1 = 0 = y (right) → top-2 = 1; row 1: top-1 = 2 wrong → 2; row 2: right → top-2 = 2
    assert wrong_labels(logits, y).tolist() == [1, 2, 2]
    assert (wrong_labels(torch.randn(50, 7), torch.randint(0, 7, (50,))) >= 0).all()
    with pytest.raises(FortifyError, match="K >= 2"):
        wrong_labels(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))


def test_aux_losses_match_definition_and_only_while_capturing():
    b = block(lambda_sep=0.5, lambda_rec=2.0).eval()
    calls = []
    b.aux.register_forward_hook(lambda *a: calls.append(1))
    f = torch.randn(4, 8, 3, 3)
    b(f)
    assert calls == [] and b.recorded == {}  # aux head runs only while capturing
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.randn(4, 5)
    with capture_aux(nn.Sequential(b)) as cap:  # capture_aux looks at submodules
        b(f)
        terms = cap.losses(AuxContext(y=y, logits=logits))
    assert len(calls) == 3
    p = b.parts(f)
    head = lambda t: b.aux(t.mean((2, 3)))  # noqa: E731
    y_w = wrong_labels(logits, y)
    l_sep = F.cross_entropy(head(p.f_pos), y) + F.cross_entropy(head(p.f_neg), y_w)
    l_rec = F.cross_entropy(head(p.f_neg_rec), y)
    torch.testing.assert_close(terms["fsr_sep"], 0.5 * l_sep)
    torch.testing.assert_close(terms["fsr_rec"], 2.0 * l_rec)
    assert b.recorded == {}  # dropped after the capture


def test_ablations_outputs_and_terms():
    f = torch.randn(2, 8, 4, 4)
    y, logits = torch.tensor([0, 1]), torch.randn(2, 5)
    nosep = block(ablation="no-separation").eval()
    assert nosep.separation is None
    with torch.no_grad():
        torch.testing.assert_close(nosep(f), f + nosep.recalibration(f))
    with capture_aux(nn.Sequential(nosep)) as cap:
        nosep(f)
        assert set(cap.losses(AuxContext(y=y, logits=logits))) == {"fsr_rec"}
    norec = block(ablation="no-recalibration").eval()
    assert norec.recalibration is None
    with torch.no_grad():
        p = norec.parts(f)
        torch.testing.assert_close(norec(f), p.mask * f)
    with capture_aux(nn.Sequential(norec)) as cap:
        norec(f)
        assert set(cap.losses(AuxContext(y=y, logits=logits))) == {"fsr_sep"}


def test_binary_mask_hard_values_with_straight_through_gradient():
    b = block(mask="binary")
    f = torch.randn(2, 8, 4, 4)
    b.train()
    m = b.compute_mask(b.separation(f))
    assert set(torch.unique(m.detach()).tolist()) <= {0.0, 1.0}
    b(f).sum().backward()
    assert b.separation[0].weight.grad is not None and b.separation[0].weight.grad.abs().sum() > 0
    b.eval()
    with torch.no_grad():
        r = b.separation(f)
        assert torch.equal(b.compute_mask(r), (r > 0).float())


# ---------------------------------------------------------------- options / errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tau": 0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"ablation": "no-sep"}, "ablation"),
        ({"mask": "hard"}, "mask"),
        ({"hidden": 0}, "hidden"),
        ({"lambda_sep": -1}, "lambda_sep"),
        ({"eps_log": 0.5}, "eps_log"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        FSRBlock(8, 10, **kw)


def seq_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_attach_errors():
    with pytest.raises(FortifyError, match="close matches"):
        attach_fsr(seq_cnn(), "4x", 3, (1, 8, 8))
    with pytest.raises(FortifyError, match="4-D"):
        attach_fsr(seq_cnn(), "6", 3, (1, 8, 8))  # Flatten output is 2-D
    model = attach_fsr(seq_cnn(), "4", 3, (1, 8, 8), hidden=4)
    with pytest.raises(FortifyError, match="already attached"):
        attach_fsr(model, "net.4", 3, (1, 8, 8))
    with pytest.raises(FortifyError, match="twice"):
        attach_fsr(seq_cnn(), ["4", "4"], 3, (1, 8, 8))
    with pytest.raises(ConfigError, match="tau"):
        attach_fsr(seq_cnn(), "4", 3, (1, 8, 8), tau=0.0)
    with pytest.raises(ConfigError, match="allowed options"):
        attach_fsr(seq_cnn(), "4", 3, (1, 8, 8), temperature=0.1)


def _train_steps(model: nn.Module, x, y, steps: int = 8, lr: float = 0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        model.train()
        with capture_aux(model) as cap:
            logits = model(x)
            terms = cap.losses(AuxContext(y=y, logits=logits, x=x))
        loss = F.cross_entropy(logits, y) + sum(terms.values())
        opt.zero_grad()
        loss.backward()
        losses.append((loss.item(), set(terms)))
        if len(losses) == 1:
            grads = {n: p.grad for n, p in model.named_parameters() if "fortify_defenses" in n}
        opt.step()
    return losses, grads


def test_attach_to_sequential_multiple_blocks_and_train():
    model = attach_fsr(seq_cnn(), ["2", "4"], 3, (1, 8, 8), hidden=4)
    assert set(fsr_blocks(model)) == {"net.2", "net.4"}
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    assert model(x).shape == (16, 3)
    losses, grads = _train_steps(model, x, y)
    assert losses[0][1] == {"fsr_sep", "fsr_rec"}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "aux" in n)
    assert all(g is not None for g in grads.values())
    assert losses[-1][0] < losses[0][0]
    model.eval()
    copy.deepcopy(model)(x)  # hooks survive a deep copy


def test_attach_to_torchvision_resnet18_and_train():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=4)
    model = attach_fsr(model, "layer3", 4, (3, 32, 32), hidden=16)
    blk = fsr_blocks(model)["layer3"]
    assert blk.channels == 256
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
    losses, grads = _train_steps(model, x, y, steps=6, lr=0.01)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["fortify_defenses.layer3.separation.0.weight"].abs().sum() > 0
    assert losses[-1][0] < losses[0][0]
    # state dict round-trip into a freshly built model gives the same logits
    model.eval()
    fresh = attach_fsr(tv.models.resnet18(num_classes=4), "layer3", 4, (3, 32, 32), hidden=16)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_torchattacks_pgd_runs_unchanged_on_fsr_model():
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = attach_fsr(seq_cnn(), "4", 3, (1, 8, 8), hidden=4).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert not torch.equal(x_adv, x)
    with torch.no_grad():
        loss_clean = F.cross_entropy(model(x), y)
        loss_adv = F.cross_entropy(model(x_adv), y)
    assert loss_adv > loss_clean


def test_builder_uses_backbone_default_position_and_options():
    from fortify.config.schema import DefenseConfig, ModelConfig
    from fortify.factory import build_model

    model = build_model(
        ModelConfig(name="small-cnn", kwargs={"width": 4}),
        [DefenseConfig(kind="fsr", options={"tau": 0.2, "hidden": 8})],
        num_classes=10,
        image_shape=(1, 28, 28),
    )
    blocks = fsr_blocks(model)
    assert list(blocks) == ["features.1"]
    assert blocks["features.1"].tau == 0.2 and blocks["features.1"].hidden == 8
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="allowed options"):
        build_model(
            ModelConfig(name="small-cnn", kwargs={"width": 4}),
            [DefenseConfig(kind="fsr", options={"lamda_sep": 1})],
            num_classes=10,
            image_shape=(1, 28, 28),
        )
