"""Attacks: closed-form optimum on linear models, torchattacks cross-check, semantics, hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fortify.attacks as A
from fortify.errors import ConfigError, DataError, EvaluationError, FortifyError


def _train_small(x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> nn.Module:
    import fortify.models

    torch.manual_seed(0)
    model = fortify.models.create("small-cnn", 10, 1, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    import fortify.data

    splits = fortify.data.load_dataset("digits")
    xtr, ytr = splits.train.floats()
    xte, yte = splits.test.floats()
    return xtr, ytr, xte[:128], yte[:128]


@pytest.fixture(scope="module")
def small_model(digits):
    xtr, ytr, xte, yte = digits
    model = _train_small(xtr, ytr)
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.7, f"fixture model did not train (acc {acc:.2f})"
    return model


def _linear(k: int, d: int = 16, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, d, generator=g))
        model[1].bias.copy_(torch.randn(k, generator=g) * 0.1)
    return model.eval()


def _optimal_margin(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, j: torch.Tensor, eps: float
) -> torch.Tensor:
    """min over the L∞ ball ∩ [0,1] of (w_y − w_j)·x' + b_y − b_j, in closed form."""
    w, b = model[1].weight.double(), model[1].bias.double()
    d = w[y] - w[j]  # (N, D)
    xf = x.flatten(1).double()
    x_opt = (xf - eps * torch.sign(d)).clamp(0, 1)
    return (d * x_opt).sum(1) + b[y] - b[j]


def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    w, b = model[1].weight.double(), model[1].bias.double()
    xf = x.flatten(1).double()
    return ((w[y] - w[j]) * xf).sum(1) + b[y] - b[j]


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_reaches_closed_form_optimum_binary_linear(loss):
    model = _linear(2)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 4, 4, generator=g)
    y = torch.randint(0, 2, (64,), generator=g)
    eps = 0.05
    # Large κ keeps the C&W gradient alive past misclassification, so PGD walks to the corner.
    x_adv = A.pgd(
        model,
        x,
        y,
        eps=eps,
        steps=20,
        step_size=eps / 4,
        loss=loss,
        kappa=1e6,
        random_start=True,
        generator=torch.Generator().manual_seed(0),
    )
    j = 1 - y
    achieved = _margin(model, x_adv, y, j)
    optimum = _optimal_margin(model, x, y, j, eps)
    assert torch.allclose(achieved, optimum, atol=1e-5), (achieved - optimum).abs().max()
    # the clean margin is clearly larger, so this is not vacuous
    assert (_margin(model, x, y, j) - optimum).min() > 1e-3


def test_fgsm_is_exact_on_binary_linear():
    model = _linear(2, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 1, 4, 4, generator=g)
    y = torch.randint(0, 2, (64,), generator=g)
    for eps in (0.01, 0.2):
        x_adv = A.fgsm(model, x, y, eps=eps)
        achieved = _margin(model, x_adv, y, 1 - y)
        optimum = _optimal_margin(model, x, y, 1 - y, eps)
        assert torch.allclose(achieved, optimum, atol=1e-5)


def test_targeted_pgd_reaches_pairwise_optimum_multiclass():
    """Targeted C&W with huge κ on a 5-class linear model where only classes y and t differ."""
    model = _linear(5, seed=4)
    with torch.no_grad():  # make class t dominate all others except y, so the margin is pairwise
        model[1].weight[2:] = 0.0
        model[1].bias[2:] = -1e3
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 4, 4, generator=g)
    y = torch.zeros(32, dtype=torch.long)
    t = torch.ones(32, dtype=torch.long)
    x_adv = A.pgd(
        model,
        x,
        y,
        eps=0.1,
        steps=30,
        step_size=0.02,
        loss="cw",
        kappa=1e6,
        targeted=True,
        target=t,
    )
    assert torch.allclose(
        _margin(model, x_adv, y, t), _optimal_margin(model, x, y, t, 0.1), atol=1e-5
    )


def test_l2_pgd_stays_in_ball_and_beats_random():
    model = _linear(3, seed=6)
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    y = model(x).argmax(1)
    eps = 0.5
    x_adv = A.pgd(model, x, y, eps=eps, steps=20, norm="l2")
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    noise = torch.randn_like(x)
    x_rand = (x + eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    loss = nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x_rand), y) + 1e-3


def test_matches_torchattacks_exactly(small_model, digits):
    torchattacks = pytest.importorskip("torchattacks")
    _, _, x, y = digits
    eps = 0.1
    ref_fgsm = torchattacks.FGSM(small_model, eps=eps)(x, y)
    ours_fgsm = A.fgsm(small_model, x, y, eps=eps)
    with torch.no_grad():
        acc_ref = (small_model(ref_fgsm).argmax(1) == y).sum().item()
        acc_ours = (small_model(ours_fgsm).argmax(1) == y).sum().item()
    assert acc_ours == acc_ref
    for steps in (10, 20):
        ref = torchattacks.PGD(
            small_model, eps=eps, alpha=eps / 10, steps=steps, random_start=False
        )(x, y)
        ours = A.pgd(
            small_model, x, y, eps=eps, steps=steps, step_size=eps / 10, random_start=False
        )
        with torch.no_grad():
            acc_ref = (small_model(ref).argmax(1) == y).sum().item()
            acc_ours = (small_model(ours).argmax(1) == y).sum().item()
        assert acc_ours == acc_ref, (steps, acc_ours, acc_ref)
        assert acc_ours < len(y)  # the attack does something


def test_best_never_above_final_and_best_examples_fool(small_model, digits):
    _, _, x, y = digits
    eps = 0.05
    kw = dict(eps=eps, steps=10, step_size=eps / 4, random_start=False)
    both = A.pgd_attack(small_model, x, y, mode="both", **kw)
    assert both.success_best is not None and both.x_best is not None
    assert (both.success_best | ~both.success).all()  # best ⊇ final on the same run
    best = A.pgd_attack(small_model, x, y, mode="best", **kw)
    final = A.pgd_attack(small_model, x, y, mode="final", **kw)
    with torch.no_grad():
        for xa, succ in (
            (best.x_adv, best.success),
            (both.x_best, both.success_best),
            (final.x_adv, final.success),
        ):
            assert (small_model(xa).argmax(1) != y)[succ].all()  # the returned examples really fool
            assert ((xa - x).abs().amax(dim=(1, 2, 3)) <= eps + 1e-6).all()
    assert best.success.sum() >= final.success.sum()
    assert both.success_best.sum() >= both.success.sum()


def test_mode_and_grads_untouched(small_model, digits):
    _, _, x, y = digits
    small_model.train()
    try:
        bn_mean = small_model.features[0][1].running_mean.clone()
        A.pgd(small_model, x[:16], y[:16], eps=0.1, steps=2)
        assert small_model.training
        # train-mode BN updates running stats during forward: the caller chose train mode
        assert not torch.equal(bn_mean, small_model.features[0][1].running_mean)
    finally:
        small_model.eval()
    params = list(small_model.parameters())
    for i, p in enumerate(params):  # existing .grad (e.g. mid-training) must survive unchanged
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    try:
        A.pgd(small_model, x[:16], y[:16], eps=0.1, steps=2)
        A.pgd(small_model, x[:16], y[:16], eps=0.1, steps=2, mode="best")
        A.fgsm(small_model, x[:16], y[:16], eps=0.1)
        assert not small_model.training
        for i, p in enumerate(params):
            assert (
                (p.grad is None)
                if i % 2 == 0
                else torch.equal(p.grad, torch.full_like(p, float(i)))
            )
    finally:
        for p in params:
            p.grad = None


def test_channels_last_and_classes(small_model, digits):
    _, _, x, y = digits
    xc = x[:8].contiguous(memory_format=torch.channels_last)
    out = A.PGD(small_model, eps=0.1, steps=3, random_start=False)(xc, y[:8])
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = A.pgd(small_model, x[:8], y[:8], eps=0.1, steps=3, random_start=False)
    assert torch.allclose(out, ref, atol=1e-6)
    assert A.FGSM(small_model, eps=0.1)(x[:8], y[:8]).shape == x[:8].shape


def test_random_start_reproducible_with_generator(small_model, digits):
    _, _, x, y = digits
    a = A.pgd(
        small_model, x[:8], y[:8], eps=0.1, steps=2, generator=torch.Generator().manual_seed(3)
    )
    b = A.pgd(
        small_model, x[:8], y[:8], eps=0.1, steps=2, generator=torch.Generator().manual_seed(3)
    )
    c = A.pgd(
        small_model, x[:8], y[:8], eps=0.1, steps=2, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_targeted_success(small_model, digits):
    _, _, x, y = digits
    t = (y + 1) % 10
    r = A.pgd_attack(small_model, x, y, eps=0.3, steps=20, targeted=True, target=t, loss="cw")
    with torch.no_grad():
        pred = small_model(r.x_adv).argmax(1)
    assert torch.equal(pred == t, r.success)
    assert r.success.float().mean() > 0.5


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(eps=0.0, steps=1), ConfigError, "eps"),
        (dict(eps=0.1, steps=0), ConfigError, "steps"),
        (dict(eps=0.1, steps=1, norm="l1"), ConfigError, "linf"),
        (dict(eps=0.1, steps=1, loss="hinge"), ConfigError, "dlr"),
        (dict(eps=0.1, steps=1, mode="worst"), ConfigError, "best"),
        (dict(eps=0.1, steps=1, targeted=True), ConfigError, "target"),
        (dict(eps=0.1, steps=1, step_size=-1.0), ConfigError, "step_size"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    model = _linear(3)
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(exc, match=words):
        A.pgd(model, x, y, **kwargs)


def test_bad_tensors_and_models():
    model = _linear(3)
    with pytest.raises(DataError, match="shape"):
        A.pgd(model, torch.rand(4, 1, 4, 4), torch.zeros(5, dtype=torch.long), eps=0.1, steps=1)
    with pytest.raises(DataError, match="float"):
        A.fgsm(
            model,
            torch.zeros(4, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            eps=0.1,
        )

    class Tuple(nn.Module):
        def forward(self, x):
            return model(x), x

    with pytest.raises(EvaluationError, match="logits"):
        A.fgsm(Tuple(), torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), eps=0.1)
    with pytest.raises(FortifyError, match="classes"):
        A.pgd(
            _linear(2),
            torch.rand(4, 1, 4, 4),
            torch.zeros(4, dtype=torch.long),
            eps=0.1,
            steps=1,
            loss="dlr",
        )


def test_both_mode_with_restarts_gives_the_final_mode_row(small_model):
    """Restarts in mode "both" re-attack every point whose *final* example does not fool, so
    its final row is exactly a mode="final" run (before, points fooled only at an intermediate
    iterate were skipped and the final row came out weaker)."""
    import fortify.data

    x, y = fortify.data.load_dataset("digits").test.floats()
    x, y = x[:300], y[:300]
    kw = dict(eps=0.1, steps=5, step_size=0.1, random_start=True)

    def run(mode: str, restarts: int) -> A.AttackResult:
        gen = torch.Generator().manual_seed(1)
        return A.pgd_attack(small_model, x, y, mode=mode, restarts=restarts, generator=gen, **kw)

    one = run("both", 1)
    # the situation that matters: some points fooled only at an intermediate iterate
    assert int((one.success_best & ~one.success).sum()) > 0
    fin, both = run("final", 3), run("both", 3)
    assert torch.equal(both.x_adv, fin.x_adv) and torch.equal(both.success, fin.success)
    assert bool((both.success_best >= both.success).all())
    # every point counted in the best row has an example that fools
    with torch.no_grad():
        fooled = small_model(both.x_best).argmax(1) != y
    assert bool(fooled[both.success_best].all())


class _DetachedPlusZero(nn.Module):
    """Gradient masking by construction: the input gradient is an expanded (stride-0) zero."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach() + 0 * x.sum()


class _FullyDetached(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach()


@pytest.mark.parametrize("wrapper", [_DetachedPlusZero, _FullyDetached])
def test_attacks_survive_masked_gradients(small_model, digits, wrapper):
    """Stride-0 or missing input gradients: no crash, the examples stay in the ball and the
    point is simply not moved by the gradient (the masking checks of `evaluate` flag it)."""
    _, _, x, y = digits
    x, y = x[:16], y[:16]
    model = wrapper(small_model).eval()
    out = A.fgsm(model, x, y, eps=0.1)
    assert torch.equal(out, x)  # zero gradient: sign 0, no step
    for norm in ("linf", "l2"):
        for mode in ("final", "best"):
            adv = A.pgd(model, x, y, eps=0.1, steps=3, norm=norm, mode=mode, random_start=False)
            assert torch.equal(adv, x), (norm, mode)
    r = A.pgd_attack(model, x, y, eps=0.1, steps=3, mode="both", restarts=2)
    assert float((r.x_adv - x).abs().max()) <= 0.1 + 1e-6


def test_evaluate_survives_a_stride_zero_gradient_model(small_model, digits):
    from fortify.evaluate import evaluate

    _, _, x, y = digits
    model = _DetachedPlusZero(small_model).eval()
    report = evaluate(model, x[:16], y[:16], suite="paper", eps=0.1, batch_size=16)
    table = report.table()[report.modes[0]]
    assert table["Natural"] >= table["PGD-20"]
    text = report.to_markdown()
    assert "zero gradients" in text and "WARN" in text  # the masking check fires


@pytest.mark.parametrize(
    "x_fn, words",
    [
        (lambda x: x * 2, r"\[0, 2\]"),
        (lambda x: x - 0.5, r"\[-0.5, 0.5\]"),
        (lambda x: x.index_fill(0, torch.tensor([1]), float("nan")), "NaN"),
        (lambda x: x.index_fill(0, torch.tensor([1]), float("inf")), "inf"),
        (lambda x: x[:0], "no pixels"),
    ],
)
def test_attacks_refuse_images_outside_the_unit_cube(x_fn, words):
    model = _linear(3)
    x = x_fn(torch.linspace(0, 1, 64).view(4, 1, 4, 4))
    y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(DataError, match=words):
        A.pgd(model, x, y, eps=0.1, steps=1)
    with pytest.raises(DataError, match=words):
        A.fgsm(model, x, y, eps=0.1)
    with pytest.raises(DataError, match=words):
        A.PGD(model, eps=0.1, steps=1)(x, y)


@pytest.mark.parametrize(
    "y, words",
    [
        (torch.tensor([0, 1, 3, 0]), r"\[0, 3\).*got 3"),
        (torch.tensor([0, 1, 7, 0]), "got 7"),
        (torch.tensor([0, -1, 2, 0]), "negative value -1"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "float32"),
        (torch.tensor([True, False, True, False]), "bool"),
    ],
)
def test_attacks_refuse_bad_labels(y, words):
    model = _linear(3)
    x = torch.rand(4, 1, 4, 4)
    for attack in (
        lambda: A.pgd(model, x, y, eps=0.1, steps=2),
        lambda: A.pgd(model, x, y, eps=0.1, steps=2, mode="best", restarts=2),
        lambda: A.fgsm(model, x, y, eps=0.1),
        lambda: A.pgd(
            model, x, torch.zeros(4, dtype=torch.long), eps=0.1, steps=1, targeted=True, target=y
        ),
    ):
        with pytest.raises(DataError, match=words):
            attack()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(eps=1.5), r"eps \(linf.*\(0, 1\].*1.5"),
        (dict(eps=float("nan")), "eps.*nan"),
        (dict(eps=float("inf")), "eps.*inf"),
        (dict(eps=True), "eps.*True"),
        (dict(eps=0.1, norm="l2", steps=1) | dict(eps=4.5), r"eps \(l2.*\(0, 4\].*4.5"),
        (dict(eps=0.1, step_size=float("inf")), "step_size.*inf"),
        (dict(eps=0.1, kappa=-1.0, loss="cw"), "kappa.*-1.0"),
        (dict(eps=0.1, kappa=float("nan"), loss="cw"), "kappa.*nan"),
        (dict(eps=0.1, steps=2.0), "steps.*2.0"),
        (dict(eps=0.1, restarts=0), "restarts.*0"),
        (dict(eps=0.1, generator=3), "generator"),
    ],
)
def test_attacks_refuse_bad_budgets(kwargs, words):
    model = _linear(3)
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    args = dict(steps=1) | kwargs
    with pytest.raises(ConfigError, match=words):
        A.pgd(model, x, y, **args)


def test_options_object_keywords_and_classes_give_the_same_examples(small_model, digits):
    """PGDOptions / FGSMOptions are the one list of settings: keywords, ``options=`` and the
    classes build the same attack (same examples for the same generator seed)."""
    _, _, x, y = digits
    x, y = x[:32], y[:32]
    kw = dict(eps=0.1, steps=4, loss="cw", kappa=1.0, restarts=2)
    opts = A.PGDOptions(**kw)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    a = A.pgd(small_model, x, y, generator=gen(), **kw)
    b = A.pgd(small_model, x, y, options=opts, generator=gen())
    atk = A.PGD(small_model, generator=gen(), **kw)
    assert (atk.eps, atk.steps, atk.loss) == (0.1, 4, "cw")
    c = atk(x, y)
    assert torch.equal(a, b) and torch.equal(a, c)
    atk.steps = 1  # an attribute write replaces the options the attack runs with
    assert atk.options == A.PGDOptions(**{**kw, "steps": 1}, generator=atk.generator)
    assert "steps=1" in repr(atk)
    f = A.fgsm(small_model, x, y, eps=0.1)
    assert torch.equal(f, A.FGSM(small_model, eps=0.1)(x, y))
    assert torch.equal(f, A.fgsm(small_model, x, y, options=A.FGSMOptions(eps=0.1)))
    with pytest.raises(ConfigError, match=r"unknown PGD option 'stpes'; did you mean steps"):
        A.pgd(small_model, x, y, eps=0.1, stpes=3)
    with pytest.raises(ConfigError, match=r"unknown FGSM option 'steps'.*allowed: eps, loss"):
        A.FGSM(small_model, eps=0.1, steps=3)
    with pytest.raises(ConfigError, match="restarts"):
        A.PGDOptions(eps=0.1, steps=1, restarts=0).validate()
    # an options object of the wrong class (or a dict) is refused, not half-used
    for bad in (A.PGDOptions(eps=0.1, steps=2), {"eps": 0.1}):
        with pytest.raises(ConfigError, match=r"options must be a FGSMOptions for FGSM, got "):
            A.fgsm(small_model, x, y, options=bad)
    with pytest.raises(ConfigError, match=r"options must be a PGDOptions for PGD, got FGSMOpt"):
        A.pgd_attack(small_model, x, y, options=A.FGSMOptions(eps=0.1))
