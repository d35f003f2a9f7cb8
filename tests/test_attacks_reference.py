"""fortify's attacks and evaluation against reference implementations.

References: torchattacks FGSM / PGD / PGDL2 (untargeted and targeted, with the random start
aligned through the global RNG), the C&W-L∞ margin loss and the DLR loss written out here as in
the FSR / TRADES evaluation code and the AutoAttack paper, pyautoattack's standard AutoAttack
called directly. Also: the ε-ball holds exactly (no tolerance) and the edge inputs a reference
comparison meets (dtypes of labels, layouts, batch of one, images at 0 and 1, train mode).

fortify's examples equal torchattacks' up to a unit in the last place: torchattacks' rounding
of ``x + clamp(x_adv - x, -eps, eps)`` can leave the ball by one unit, fortify's never does
(docs/evaluation.md, "Attacks"); the predictions on the examples are identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fortify.attacks as A
from fortify.errors import ConfigError
from fortify.evaluate import evaluate

torchattacks = pytest.importorskip("torchattacks")

#: fortify vs torchattacks after several steps: a few units in the last place of [0, 1].
ULP_TOL = 1e-6


@pytest.fixture(scope="module")
def digits():
    """A small BN conv net trained on sklearn digits, and 128 test points in [0, 1] (about
    half the pixels exactly 0, a tenth exactly 1)."""
    import fortify.data
    import fortify.models

    splits = fortify.data.load_dataset("digits")
    xtr, ytr = splits.train.floats()
    xte, yte = splits.test.floats()
    torch.manual_seed(0)
    model = fortify.models.create("small-cnn", 10, 1, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(15):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[b]), ytr[b]).backward()
            opt.step()
    model.eval()
    x, y = xte[:128].contiguous(), yte[:128].contiguous()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.8
    return model, x, y


def _pred(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf"):
    """No tolerance: the distance, computed in the images' dtype or in float64, compared with
    ``eps`` in that dtype or as a Python float."""
    assert not x_adv.requires_grad and x_adv.shape == x.shape and x_adv.dtype == x.dtype
    for d in ((x_adv - x).flatten(1), (x_adv.double() - x.double()).flatten(1)):
        dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert bool((dist <= eps).all()), dist.max().item()
        assert dist.max().item() <= eps, dist.max().item()
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def _exactly_inside(v: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per pixel: ``|v − x|`` (exact in float64) at most the largest float32 not above ``eps``,
    the pixels whose distance passes ``<= eps`` however a check computes it."""
    lim = torch.tensor(eps, dtype=torch.float64).float()
    if lim.item() > eps:
        lim = torch.nextafter(lim, torch.zeros_like(lim))
    return (v.double() - x.double()).abs() <= lim.item()


def _interior(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Images with no pixel at 0 or 1, so that the ε-ball, not [0, 1], binds."""
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 1, 8, 8, generator=g)


# -- FGSM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("eps", [0.1, 8 / 255, 0.3, 1.0], ids=["0.1", "8/255", "0.3", "1"])
def test_fgsm_equals_torchattacks_inside_the_ball(digits, eps, targeted):
    """Bit for bit wherever torchattacks' example is inside the ball; where its rounding leaves
    the ball (by one unit in the last place), fortify's pixel is the nearest one inside."""
    model, x, y = digits
    target = (y + 3) % 10
    ref_atk = torchattacks.FGSM(model, eps=eps)
    if targeted:
        ref_atk.set_mode_targeted_by_function(lambda images, labels: target)
    ref = ref_atk(x, y)
    ours = A.fgsm(model, x, y, eps=eps, targeted=targeted, target=target if targeted else None)
    inside = _exactly_inside(ref, x, eps)
    assert torch.equal(ours[inside], ref[inside])
    assert float((ours - ref).abs().max()) <= ULP_TOL
    assert torch.equal(_pred(model, ours), _pred(model, ref))
    _assert_in_ball(ours, x, eps)


# -- PGD L∞ ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eps, steps, alpha_frac, random_start, targeted",
    [
        (0.1, 20, 0.1, False, False),  # the paper suite's PGD-20
        (8 / 255, 10, 0.25, True, False),  # RiFT's PGD-10
        (0.05, 10, 2.0, True, False),  # step larger than ε
        (0.3, 20, 0.125, False, True),
        (0.1, 10, 0.25, True, True),
    ],
    ids=["pgd20", "pgd10-rs", "step>eps", "targeted", "targeted-rs"],
)
def test_pgd_linf_matches_torchattacks(digits, eps, steps, alpha_frac, random_start, targeted):
    """Same settings, same random start (both draw the uniform noise from the global RNG):
    the examples agree to a few units in the last place and every prediction is the same."""
    model, x, y = digits
    target = (y + 1) % 10
    alpha = alpha_frac * eps
    ref_atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    if targeted:
        ref_atk.set_mode_targeted_by_function(lambda images, labels: target)
    torch.manual_seed(11)
    ref = ref_atk(x, y)
    torch.manual_seed(11)
    ours = A.pgd(
        model, x, y, eps=eps, steps=steps, step_size=alpha, random_start=random_start,
        targeted=targeted, target=target if targeted else None,
    )  # fmt: skip
    assert float((ours - ref).abs().max()) <= ULP_TOL
    assert torch.equal(_pred(model, ours), _pred(model, ref))
    _assert_in_ball(ours, x, eps)
    if not targeted:
        assert bool((_pred(model, ours) != y).any())  # the attack does something


# -- PGD L2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("interior", [False, True])
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("eps", [0.5, 1.5])
def test_pgd_l2_matches_torchattacks_pgdl2(digits, eps, random_start, interior):
    """ε is a per-sample L2 norm in [0, 1] pixel units; steps are the gradient divided by its
    per-sample norm; the random start (Gaussian direction, uniform radius) draws from the global
    RNG in torchattacks' order. Same predictions; fortify's examples lie in the ball exactly."""
    model, x, y = digits
    if interior:
        x = _interior(len(x))
        y = _pred(model, x)
    ref_atk = torchattacks.PGDL2(model, eps=eps, alpha=eps / 4, steps=10, random_start=random_start)
    torch.manual_seed(5)
    ref = ref_atk(x, y)
    torch.manual_seed(5)
    ours = A.pgd(
        model, x, y, eps=eps, steps=10, step_size=eps / 4, random_start=random_start, norm="l2"
    )
    # Equal to rounding, except that a point whose path crosses a ReLU kink within rounding
    # distance follows another (equally valid) path: allow two such rows of 128.
    apart = (ours - ref).flatten(1).abs().amax(1) > 1e-5
    assert int(apart.sum()) <= 2, int(apart.sum())
    assert torch.equal(_pred(model, ours), _pred(model, ref))
    _assert_in_ball(ours, x, eps, "l2")


def test_pgd_l2_projection_and_zero_gradient_per_sample(digits):
    """A point whose input gradient is exactly 0 does not move (no NaN from 0/0), the others do
    as in torchattacks; a step far beyond ε lands every moving point on the ε-sphere."""
    model, _, _ = digits
    x = _interior(32, seed=3)

    class HalfDead(nn.Module):
        def forward(self, inp):  # constant logits for the first 8 images: zero gradient
            out = model(inp)
            dead = torch.arange(len(inp)) < 8
            return torch.where(dead[:, None], out.detach(), out)

    net = HalfDead()
    y = _pred(net, x)
    eps = 0.1
    ours = A.pgd(net, x, y, eps=eps, steps=3, step_size=10.0, random_start=False, norm="l2")
    ref = torchattacks.PGDL2(net, eps=eps, alpha=10.0, steps=3, random_start=False)(x, y)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[:8], x[:8]) and torch.equal(ref[:8], x[:8])
    assert float((ours - ref).abs().max()) <= 1e-5
    dist = (ours[8:] - x[8:]).flatten(1).norm(dim=1)
    assert bool((dist > eps - 1e-5).all())  # on the sphere (no pixel clipped at 0 or 1 here)
    _assert_in_ball(ours, x, eps, "l2")


# -- C&W-L∞ (margin loss) and DLR ------------------------------------------------------------


def _cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """The FSR / TRADES evaluation code's CW loss, summed: −clamp(z_y − max_{j≠y} z_j + κ, 0)."""
    onehot = torch.zeros_like(logits).scatter_(1, y[:, None], 1.0)
    real = (onehot * logits).sum(1)
    other = ((1.0 - onehot) * logits - onehot * 10000.0).max(1).values
    return (-torch.clamp(real - other + kappa, min=0.0)).sum()


def _reference_pgd(model, x, y, eps, alpha, steps, loss_fn):
    """PGD L∞ without random start as the FSR / TRADES evaluation code writes it."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("kappa", [0.0, 50.0])
@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_cw_pgd_matches_a_written_out_cw_linf(digits, eps, kappa):
    model, x, y = digits
    ref = _reference_pgd(model, x, y, eps, eps / 10, 30, lambda z, t: _cw_margin_loss(z, t, kappa))
    ours = A.pgd(
        model, x, y, eps=eps, steps=30, step_size=eps / 10, random_start=False, loss="cw",
        kappa=kappa,
    )  # fmt: skip
    assert float((ours - ref).abs().max()) <= ULP_TOL
    assert torch.equal(_pred(model, ours), _pred(model, ref))
    _assert_in_ball(ours, x, eps)


def test_attack_losses_match_their_formulas():
    from fortify.attacks.losses import attack_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    t = (y + 1 + torch.randint(0, 9, (64,), generator=g)) % 10
    srt = z.sort(1, descending=True).values
    z_y, z_t = z.gather(1, y[:, None])[:, 0], z.gather(1, t[:, None])[:, 0]
    other_y = z.scatter(1, y[:, None], -1e9).max(1).values
    other_t = z.scatter(1, t[:, None], -1e9).max(1).values
    kw = dict(kappa=5.0)
    cases = {
        ("ce", False): nn.functional.cross_entropy(z, y, reduction="none"),
        ("ce", True): -nn.functional.cross_entropy(z, t, reduction="none"),
        ("cw", False): -torch.clamp(z_y - other_y + 5.0, min=0),
        ("cw", True): -torch.clamp(other_t - z_t + 5.0, min=0),
        ("dlr", False): -(z_y - other_y) / (srt[:, 0] - srt[:, 2] + 1e-12),
        ("dlr", True): -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12),
    }
    for (loss, targeted), want in cases.items():
        got = attack_loss(z, y, t if targeted else None, loss=loss, targeted=targeted, **kw)
        assert torch.allclose(got, want, atol=1e-5), (loss, targeted)
    # the CW loss is the written-out reference of the FSR / TRADES code
    cw = attack_loss(z, y, None, loss="cw", targeted=False, kappa=50.0).sum()
    assert torch.allclose(cw, _cw_margin_loss(z, y, 50.0))


# -- the ε-ball, exactly -----------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.1, 8 / 255, 0.3, 1 / 3], ids=["0.1", "8/255", "0.3", "1/3"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("mode", ["final", "best", "both"])
def test_examples_lie_in_the_ball_without_tolerance(digits, eps, norm, mode):
    """``(x_adv − x).abs().max() <= eps`` holds as written, in float32 and in float64 (before,
    ``x + eps`` rounded up left the ball by one unit in the last place, as torchattacks' does)."""
    model, xd, yd = digits
    for x, y in ((xd[:64], yd[:64]), (_interior(64), yd[:64])):
        r = A.pgd_attack(
            model, x, y, eps=eps, steps=5, step_size=eps / 2, norm=norm, mode=mode,
            restarts=2, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        _assert_in_ball(r.x_adv, x, eps, norm)
        if r.x_best is not None:
            _assert_in_ball(r.x_best, x, eps, norm)
        if norm == "linf":
            _assert_in_ball(A.fgsm(model, x, y, eps=eps), x, eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_ball_holds_in_other_dtypes(dtype):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).to(dtype).eval()
    x = _interior(16).to(dtype)
    y = torch.zeros(16, dtype=torch.long)
    for norm, eps in (("linf", 0.1), ("l2", 0.3)):
        adv = A.pgd(model, x, y, eps=eps, steps=3, step_size=eps, norm=norm)
        _assert_in_ball(adv, x, eps, norm)


# -- edge inputs -----------------------------------------------------------------------------


_VARIANTS = {
    "int32 labels": lambda x, y: (x, y.int()),
    "channels_last": lambda x, y: (x.contiguous(memory_format=torch.channels_last), y),
    "non-contiguous view": lambda x, y: (torch.stack([x, x], -1)[..., 0], y),
    "requires_grad": lambda x, y: (x.clone().requires_grad_(True), y),
    "non-leaf requires_grad": lambda x, y: (x.clone().requires_grad_(True) * 1.0, y),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_input_variants_give_the_same_examples(digits, variant, norm):
    """Labels as int32, channels-last or strided images, images that require grad: the same
    examples as for contiguous float images with int64 labels, detached, same shape and dtype;
    the caller's tensors keep no gradient."""
    model, x, y = digits
    x, y = x[:32], y[:32]
    xv, yv = _VARIANTS[variant](x, y)
    eps = 0.1 if norm == "linf" else 0.5
    kw = dict(eps=eps, steps=3, norm=norm)
    want = A.pgd(model, x, y, generator=torch.Generator().manual_seed(1), **kw)
    got = A.pgd(model, xv, yv, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(got, want)
    assert not got.requires_grad and got.grad_fn is None
    if xv.is_leaf:
        assert xv.grad is None
    if norm == "linf":
        assert torch.equal(A.fgsm(model, xv, yv, eps=eps), A.fgsm(model, x, y, eps=eps))
    if variant == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_batch_of_one_and_saturated_images(digits):
    """One image, and images entirely at 0 or at 1: same as torchattacks, in [0, 1]."""
    model, x, y = digits
    ones, zeros = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    for xb in (x[:1], ones, zeros, torch.cat([ones[:1], zeros[:1], x[:2]])):
        yb = y[: len(xb)]
        ref = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)(xb, yb)
        ours = A.pgd(model, xb, yb, eps=0.1, steps=5, step_size=0.02, random_start=False)
        assert float((ours - ref).abs().max()) <= ULP_TOL
        _assert_in_ball(ours, xb, 0.1)
        _assert_in_ball(A.fgsm(model, xb, yb, eps=0.1), xb, 0.1)
        _assert_in_ball(A.pgd(model, xb, yb, eps=0.5, steps=2, norm="l2"), xb, 0.5, "l2")


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, x, y: A.pgd(m, x, y, eps=0.0, steps=2), r"eps \(linf.*\(0, 1\], got 0.0"),
        (lambda m, x, y: A.fgsm(m, x, y, eps=0.0), r"eps \(linf.*\(0, 1\], got 0.0"),
        (lambda m, x, y: A.PGD(m, eps=0, steps=2)(x, y), r"eps \(linf.*\(0, 1\], got 0"),
        (lambda m, x, y: A.pgd(m, x, y, eps=1.5, steps=2), r"eps \(linf.*\(0, 1\], got 1.5"),
        (
            lambda m, x, y: evaluate(m, x, y, eps=0.0, suite="quick", checks=False),
            "eps must be a positive number",
        ),
    ],
    ids=["pgd-0", "fgsm-0", "PGD-class-0", "pgd-1.5", "evaluate-0"],
)
def test_eps_zero_and_above_one_are_refused_naming_the_range(digits, call, words):
    """Documented: ε ≤ 0 and L∞ ε > 1 raise ConfigError naming the allowed range (before, PGD
    named (0, inf) for an L∞ ε of 0)."""
    model, x, y = digits
    with pytest.raises(ConfigError, match=words):
        call(model, x[:4], y[:4])


def test_eps_one_is_allowed(digits):
    model, x, y = digits
    adv = A.pgd(model, x[:8], y[:8], eps=1.0, steps=3)
    _assert_in_ball(adv, x[:8], 1.0)


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def test_train_mode_model(digits):
    """``evaluate`` attacks in eval mode and leaves mode and BN statistics untouched (like
    torchattacks' default). The attack functions use the model as given (documented): in train
    mode BN normalises with batch statistics and updates its running statistics."""
    model, x, y = digits
    net = copy.deepcopy(model).train()
    before = _bn_state(net)
    report = evaluate(net, x[:32], y[:32], suite="quick", eps=0.1, checks=False)
    assert net.training and all(torch.equal(a, b) for a, b in zip(before, _bn_state(net)))
    eval_net = copy.deepcopy(model).eval()
    x_adv = A.pgd(eval_net, x[:32], y[:32], eps=0.1, steps=20, step_size=0.01, random_start=False)
    assert torch.equal(report.correct("PGD-20"), _pred(eval_net, x_adv) == y[:32])
    A.pgd(net, x[:32], y[:32], eps=0.1, steps=2)
    assert net.training
    assert not all(torch.equal(a, b) for a, b in zip(before, _bn_state(net)))
    frozen = copy.deepcopy(model).eval()
    before = _bn_state(frozen)
    A.pgd(frozen, x[:32], y[:32], eps=0.1, steps=2)
    A.fgsm(frozen, x[:32], y[:32], eps=0.1)
    assert not frozen.training
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_state(frozen)))


# -- robust accuracy: fortify.evaluate vs torchattacks by hand --------------------------------


@pytest.mark.parametrize("batch_size", [128, 50])
def test_paper_suite_equals_torchattacks_by_hand(digits, batch_size):
    """The paper suite (final mode) column by column: FGSM, PGD-20 / PGD-100 (step 0.1ε, no
    random start), C&W (PGD-30 on the margin loss, κ = 50) and their per-point worst case; the
    points the model already gets wrong are attacked too (torchattacks has no early stop)."""
    model, x, y = digits
    eps = 0.05
    report = evaluate(model, x, y, suite="paper", eps=eps, checks=False, batch_size=batch_size)
    clean = _pred(model, x) == y
    assert not bool(clean.all())  # a misclassified point takes part
    hand = {
        "FGSM": torchattacks.FGSM(model, eps=eps)(x, y),
        "PGD-20": torchattacks.PGD(model, eps=eps, alpha=eps / 10, steps=20, random_start=False)(
            x, y
        ),
        "PGD-100": torchattacks.PGD(model, eps=eps, alpha=eps / 10, steps=100, random_start=False)(
            x, y
        ),
        "C&W": _reference_pgd(
            model, x, y, eps, eps / 10, 30, lambda z, t: _cw_margin_loss(z, t, 50)
        ),
    }
    worst = clean.clone()
    for name, x_adv in hand.items():
        correct = _pred(model, x_adv) == y
        worst &= correct
        assert torch.equal(report.correct(name), correct), name
    assert torch.equal(report.correct("Ensemble"), worst)
    assert 0 < worst.sum() < clean.sum()


def test_best_mode_counts_any_fooling_iterate(digits):
    """mode="best": a point is broken iff some iterate of the same run (the start included)
    fools the model; the returned example fools it. Written out with torchattacks' steps."""
    model, x, y = digits
    eps, alpha, steps = 0.05, 0.02, 10
    kw = dict(eps=eps, steps=steps, step_size=alpha, random_start=False)
    r = A.pgd_attack(model, x, y, mode="best", **kw)
    x_adv, fooled = x.clone(), _pred(model, x) != y
    for _ in range(steps):  # one torchattacks step from the current iterate, projected around x
        x_adv = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=1, random_start=False)(x_adv, y)
        x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0, 1)
        fooled |= _pred(model, x_adv) != y
    assert torch.equal(r.success, fooled)
    assert bool((_pred(model, r.x_adv) != y)[r.success].all())
    _assert_in_ball(r.x_adv, x, eps)


# -- AutoAttack --------------------------------------------------------------------------------


@pytest.mark.slow
def test_autoattack_suite_equals_pyautoattack_called_directly():
    """Standard version, same ε, points and seed, one batch: the same points survive."""
    import pyautoattack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = _pred(model, x)
    y[:2] = (y[:2] + 1) % 10  # two points the model gets wrong
    eps = 0.03
    report = evaluate(model, x, y, suite="autoattack", eps=eps, checks=False, seed=0)
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0)
    aa.verbose = False
    out = aa.run_standard_evaluation(x, y, batch_size=len(x))
    direct = _pred(model, out[0] if isinstance(out, tuple) else out) == y
    assert torch.equal(report.correct("AutoAttack"), direct)
    assert 0 < int(direct.sum()) < 10  # some points broken, some robust
