"""FD, CAS and CIFS blocks: each formula against a direct restatement, attachment, configs,
save/load, bit-identical resume, torchattacks PGD on the defended model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.config import ExperimentConfig, load_config
from fortify.config.schema import DefenseConfig, ModelConfig
from fortify.defenses.attach import attached
from fortify.defenses.cas import CASBlock, CASOptions, attach_cas, cas_blocks
from fortify.defenses.cifs import CIFSBlock, CIFSOptions, attach_cifs
from fortify.defenses.contract import AuxContext, capture_aux, provide_labels
from fortify.defenses.fd import FDBlock, FDOptions, attach_fd
from fortify.errors import ConfigError, FortifyError
from fortify.factory import build_model
from fortify.models import create

torch.manual_seed(0)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# FD


def _fd(op: str, channels: int = 6, **kw) -> FDBlock:
    torch.manual_seed(1)
    block = FDBlock(channels, FDOptions(operation=op, zero_init=False, **kw)).eval()
    for conv in (block.theta, block.phi):
        if conv is not None:
            nn.init.normal_(conv.weight)  # larger than the 0.01 init: affinities far from uniform
    return block


def _embedded(block: FDBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if block.theta is None:
        return x.flatten(2), x.flatten(2)
    wt, wp = block.theta.weight[:, :, 0, 0], block.phi.weight[:, :, 0, 0]
    return torch.einsum("dc,ncp->ndp", wt, x.flatten(2)), torch.einsum(
        "dc,ncp->ndp", wp, x.flatten(2)
    )


@pytest.mark.parametrize("embed", [True, False])
def test_fd_gaussian_nonlocal_is_softmax_affinity_over_positions(embed):
    block = _fd("nonlocal_gaussian", embed=embed)
    x = _x(2, 6, 5, 4)
    th, ph = _embedded(block, x)
    d = th.shape[1]
    aff = torch.softmax(torch.einsum("ndp,ndq->npq", th, ph) / math.sqrt(d), dim=-1)
    want = torch.einsum("npq,ncq->ncp", aff, x.flatten(2)).view_as(x)
    torch.testing.assert_close(block.denoise(x), want, rtol=1e-5, atol=1e-5)
    # the whole block: x + BN(conv1x1(D(x))) with BN's running statistics (eval)
    bn = block.bn
    z = torch.einsum("oc,nchw->nohw", block.conv.weight[:, :, 0, 0], want)
    z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(block(x), x + z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(2, 2), (6, 5)])  # both evaluation orders (d·C vs P²)
def test_fd_dot_product_nonlocal(size):
    block = _fd("nonlocal_dot", channels=8)
    x = _x(2, 8, *size)
    th, ph = _embedded(block, x)
    p = size[0] * size[1]
    aff = torch.einsum("ndp,ndq->npq", th, ph) / p
    want = torch.einsum("npq,ncq->ncp", aff, x.flatten(2)).view_as(x)
    torch.testing.assert_close(block.denoise(x), want, rtol=1e-5, atol=1e-5)


def test_fd_local_filters_match_a_loop_over_windows():
    x = _x(1, 3, 5, 6)
    bil, mean, med = _fd("bilateral", channels=3), _fd("mean", 3), _fd("median", 3)
    th, ph = _embedded(bil, x)
    d = th.shape[1]
    th, ph = th.view(1, d, 5, 6), ph.view(1, d, 5, 6)
    want_b, want_m, want_med = (torch.zeros_like(x) for _ in range(3))
    for i in range(5):
        for j in range(6):
            rows = range(max(i - 1, 0), min(i + 2, 5))
            cols = range(max(j - 1, 0), min(j + 2, 6))
            nb = [(a, b) for a in rows for b in cols]
            s = torch.stack([(th[0, :, i, j] * ph[0, :, a, b]).sum() / math.sqrt(d) for a, b in nb])
            w = torch.softmax(s, 0)
            vals = torch.stack([x[0, :, a, b] for a, b in nb])  # (k, C)
            want_b[0, :, i, j] = (w[:, None] * vals).sum(0)
            want_m[0, :, i, j] = vals.mean(0)
            clamp = [(min(max(a, 0), 4), min(max(b, 0), 5)) for a in (i - 1, i, i + 1)
                     for b in (j - 1, j, j + 1)]  # fmt: skip
            want_med[0, :, i, j] = torch.stack([x[0, :, a, b] for a, b in clamp]).median(0).values
    torch.testing.assert_close(bil.denoise(x), want_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.denoise(x), want_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(med.denoise(x), want_med)


def test_fd_starts_as_identity_and_guards_memory():
    block = FDBlock(4)
    x = _x(3, 4, 5, 5)
    assert torch.equal(block.train()(x), x) and torch.equal(block.eval()(x), x)
    null = FDBlock(4, FDOptions(operation="none", zero_init=False)).eval()
    assert not torch.equal(null(x), x)
    tiny = FDBlock(4, FDOptions(max_affinity_mib=1e-4))
    with pytest.raises(FortifyError, match="nonlocal_dot"):
        tiny(x)
    with pytest.raises(ConfigError, match="window"):
        FDOptions(window=4).validate()
    with pytest.raises(ConfigError, match="operation='gauss'"):
        FDOptions(operation="gauss").validate()


# ---------------------------------------------------------------------------------------------
# CAS


def _cas_ref(f, fc, classes):
    return f * fc.weight[classes][:, :, None, None]


def test_cas_mask_is_the_weight_row_of_the_label_in_training_and_prediction_in_eval():
    torch.manual_seed(2)
    block = CASBlock(6, 4)
    f = _x(5, 6, 3, 3).relu()
    y = torch.tensor([0, 1, 2, 3, 0])
    logits = f.mean((2, 3)) @ block.fc.weight.T + block.fc.bias
    pred = logits.argmax(1)
    assert not torch.equal(pred, y)  # the two rules give different masks here
    block.train()
    with provide_labels(block, y):
        torch.testing.assert_close(block(f), _cas_ref(f, block.fc, y))
    torch.testing.assert_close(block(f), _cas_ref(f, block.fc, pred))  # no labels: prediction
    block.eval()
    with provide_labels(block, y):  # evaluation ignores labels (no label leakage)
        torch.testing.assert_close(block(f), _cas_ref(f, block.fc, pred))
    block.opts.selection = "label"
    with pytest.raises(FortifyError, match="provide_labels"):
        block(f)
    with provide_labels(block, y):
        torch.testing.assert_close(block(f), _cas_ref(f, block.fc, y))


def test_cas_input_gradient_is_the_mask_and_loss_is_mean_over_heads():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 5, 1))
    net = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    net = attach_cas(net, ["0.1", "0.2"], 3, (3, 6, 6), CASOptions(beta=0.7)).train()
    x, y = _x(4, 3, 6, 6).sigmoid(), torch.tensor([0, 1, 2, 1])
    with capture_aux(net, labels=y) as cap:
        logits = net(x)
    terms = cap.losses(AuxContext(y=y, logits=logits))
    b1, b2 = cas_blocks(net).values()
    h1 = F.relu(model[0](x))
    p1 = b1.fc(h1.mean((2, 3)))
    f1 = _cas_ref(h1, b1.fc, y)
    h2 = F.conv2d(f1, model[2].weight, model[2].bias)  # the module itself is hooked
    p2 = b2.fc(h2.mean((2, 3)))
    want = 0.7 * (F.cross_entropy(p1, y) + F.cross_entropy(p2, y)) / 2
    torch.testing.assert_close(terms["cas"], want)
    # eval: d out / d f = mask (the argmax has no gradient)
    b1.eval()
    f = h1.detach().requires_grad_()
    (g,) = torch.autograd.grad(b1(f).sum(), f)
    cls = b1.fc(f.mean((2, 3))).argmax(1)
    torch.testing.assert_close(g, b1.fc.weight[cls][:, :, None, None].expand_as(f).detach())
    summed = attach_cas(create("small-cnn", num_classes=3, in_channels=3, width=4),
                        ["features.0", "features.1"], 3, (3, 8, 8),
                        CASOptions(average=False))  # fmt: skip
    with capture_aux(summed, labels=y) as cap:
        out = summed(x[:, :, :8, :8].contiguous())
    assert set(cap.losses(AuxContext(y=y, logits=out))) == {"cas[features.0]", "cas[features.1]"}


# ---------------------------------------------------------------------------------------------
# CIFS


def _cifs_ref(block: CIFSBlock, z: torch.Tensor, classes: torch.Tensor, create_graph: bool):
    """The paper's relevance: autograd of the selected raw probe logits w.r.t. a detached z'."""
    with torch.enable_grad():
        zd = z.detach().requires_grad_()
        u = zd.mean((2, 3))
        if block.hidden_fc is not None:
            u = F.softplus(block.hidden_fc(u), beta=block.opts.softplus_beta)
        ell = block.fc(u)
        s = ell.gather(1, classes).sum()
        (grad,) = torch.autograd.grad(s, zd, create_graph=create_graph)
    m = torch.softmax(grad.sum((2, 3)), dim=1)
    return z * m[:, :, None, None]


@pytest.mark.parametrize("probe", ["linear", "nonlinear"])
def test_cifs_matches_autograd_relevance_and_its_second_order_gradients(probe):
    torch.manual_seed(4)
    block = CIFSBlock(8, 5, probe, CIFSOptions(hidden=6))
    z = _x(4, 8, 3, 3, seed=1).relu() * 3
    y = torch.tensor([0, 1, 2, 3])
    block.eval()
    top2 = block.parts(z).logits.topk(2, 1).indices
    torch.testing.assert_close(block(z), _cifs_ref(block, z, top2, False), rtol=1e-5, atol=1e-6)
    with torch.no_grad(), provide_labels(block, y):  # no autograd inside forward needed
        torch.testing.assert_close(block(z), _cifs_ref(block, z, top2, False), rtol=1e-5, atol=1e-6)
    block.train()
    rank2 = block.parts(z).logits.topk(2, 1).indices[:, 1:]
    cls = torch.cat([y[:, None], rank2], 1)
    with provide_labels(block, y):
        ours = block(z)
    ref = _cifs_ref(block, z, cls, True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = _x(*z.shape, seed=2)
    params = list(block.parameters())
    g_ours = torch.autograd.grad((ours * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cifs_detach_hides_the_mask_from_the_input_gradient():
    torch.manual_seed(5)
    z = _x(3, 8, 2, 2).relu().requires_grad_()
    for detach in (True, False):
        block = CIFSBlock(8, 4, "nonlinear", CIFSOptions(detach=detach)).eval()
        (g,) = torch.autograd.grad(block(z).sum(), z)
        mask = block.parts(z).mask.detach()
        const = mask[:, :, None, None].expand_as(z)
        assert torch.allclose(g, const) == detach


def test_cifs_duplicate_rule_and_normalised_loss():
    torch.manual_seed(6)
    block = CIFSBlock(6, 5, "linear", CIFSOptions(k=3, duplicate="skip-label", beta=5.0)).train()
    z = _x(64, 6, 2, 2).relu()
    y = block.parts(z).logits.argmax(1)  # the label is the probe's top class: a duplicate case
    with provide_labels(block, y):
        cls = block.parts(z).classes
    assert torch.equal(cls[:, 0], y) and (cls[:, 1:] != y[:, None]).all()
    assert (cls[:, 1] != cls[:, 2]).all()
    final = _x(64, 5, seed=3)
    with capture_aux(nn.Sequential(block), labels=y) as cap:  # providers are submodules
        block(z)
    terms = cap.losses(AuxContext(y=y, logits=final))
    p = block.parts(z).logits
    total_ref = 3 / 6 * (F.cross_entropy(final, y) + 5.0 * F.cross_entropy(p, y))
    torch.testing.assert_close(F.cross_entropy(final, y) + sum(terms.values()), total_ref)


# ---------------------------------------------------------------------------------------------
# all three: attachment, configs, save/load, resume, torchattacks

KINDS = {
    "fd": lambda m, at, k, shape: attach_fd(m, at, shape, FDOptions(zero_init=False)),
    "cas": lambda m, at, k, shape: attach_cas(m, at, k, shape),
    "cifs": lambda m, at, k, shape: attach_cifs(m, at, k, shape),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_attach_to_torchvision_resnet18_and_sequential(kind):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(num_classes=7)
    names = [n for n, _ in tv.named_parameters()]
    tv = KINDS[kind](tv, ["layer3", "layer4.1"], 7, (3, 64, 64)).eval()
    assert [n for n, _ in tv.named_parameters()][: len(names)] == names
    assert set(attached(tv)) == {"layer3", "layer4.1"}
    x = torch.rand(2, 3, 64, 64)
    out = tv(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    seq = KINDS[kind](seq, ["1", "3"], 3, (1, 6, 6)).eval()
    assert set(attached(seq)) == {"net.1", "net.3"}
    assert seq(torch.rand(5, 1, 6, 6)).shape == (5, 3)


@pytest.mark.parametrize(
    ("kind", "options", "positions"),
    [
        ("fd", {}, ["layer1", "layer2", "layer3", "layer4"]),
        ("cas", {"beta": 1.5}, ["layer4.0", "layer4.1"]),
        ("cifs", {"probes": ["linear", "linear"]}, ["layer4.0", "layer4.1"]),
    ],
)
def test_config_builder_defaults_and_bad_options(kind, options, positions):
    mcfg = ModelConfig(name="resnet18", kwargs={"width": 4})
    model = build_model(mcfg, [DefenseConfig(kind=kind, options=options)], 10, (1, 16, 16))
    assert list(attached(model)) == positions
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match="unknown .* option"):
        build_model(mcfg, [DefenseConfig(kind=kind, options={"nope": 1})], 10, (1, 16, 16))


def test_bad_values_name_the_value():
    with pytest.raises(ConfigError, match="beta .*-1"):
        CASOptions(beta=-1).validate()
    with pytest.raises(ConfigError, match="probes has 1 entries for 2"):
        attach_cifs(create("resnet18", width=4), ["layer4.0", "layer4.1"], 10, (3, 16, 16),
                    CIFSOptions(probes=["linear"]))  # fmt: skip
    with pytest.raises(ConfigError, match="selection='argmax'"):
        CIFSOptions(selection="argmax").validate()
    net = create("resnet18", width=4)
    with pytest.raises(FortifyError, match="at least one module name"):
        attach_cifs(net, [], 10, (3, 16, 16))
    with pytest.raises(ConfigError, match="options must be a CASOptions, got dict"):
        attach_cas(net, "layer4.0", 10, (3, 16, 16), {"beta": 2})


BASE = [
    "data.name=digits",
    "data.val_size=300",
    "model.kwargs={width: 4}",
    "device=cpu",
    "train.batch_size=64",
    "train.lr=0.05",
    "train.attack.eps=0.1",
    "train.attack.step_size=0.04",
    "train.attack.steps=2",
    "train.val_points=100",
    "train.val_attack_steps=2",
]
DEFENCE_OVERRIDES = {
    "fd": "defenses=[{kind: fd, at: [features.0, features.1], options: {zero_init: false}}]",
    "cas": "defenses=[{kind: cas, at: [features.0, features.1]}]",
    "cifs": "defenses=[{kind: cifs, at: [features.0, features.1]}]",
}


@pytest.fixture(scope="module")
def splits():
    from fortify.data import load_dataset

    s = load_dataset("digits", val_size=300)
    s.train = s.train.head(256)
    return s


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("kind", list(DEFENCE_OVERRIDES))
def test_save_load_and_bit_identical_resume(tmp_path, splits, kind):
    from fortify.runs import load_model
    from fortify.train import fit

    cfg = load_config(
        ExperimentConfig,
        None,
        [*BASE, DEFENCE_OVERRIDES[kind], "train.epochs=2", "train.select=last"],
    )
    full = fit(cfg, tmp_path / "full", splits=splits, progress=False)
    assert any(k.startswith(f"train/{kind}") for k in full.history[-1]) == (kind != "fd")

    def crash(epoch, record):
        if epoch == 1:  # epochs are numbered from 1
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        fit(cfg, tmp_path / "cut", splits=splits, callbacks=[crash], progress=False)
    resumed = fit(cfg, tmp_path / "cut", mode="resume", splits=splits, progress=False)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    loaded, _ = load_model(tmp_path / "full", "last")
    assert any(n.startswith("fortify_defenses.") for n in loaded.state_dict())
    x = splits.val.head(16).images.float() / 255
    full.model.eval()
    assert torch.equal(loaded(x), full.model(x))


@pytest.mark.parametrize("kind", list(KINDS))
def test_torchattacks_pgd_runs_on_the_defended_model(kind):
    torchattacks = pytest.importorskip("torchattacks")
    from fortify.attacks import pgd

    torch.manual_seed(7)
    net = create("small-cnn", num_classes=4, in_channels=1, width=4)
    model = KINDS[kind](net, ["features.0", "features.1"], 4, (1, 8, 8)).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.05, steps=3, random_start=False)
    x_adv = atk(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)
    ours = pgd(model, x, y, eps=0.1, steps=3, step_size=0.05, random_start=False)
    torch.testing.assert_close(x_adv, ours)
    assert not model.training


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
def test_training_passes_hand_the_labels_to_cas(objective):
    from fortify.config.schema import TrainConfig
    from fortify.defenses.contract import labels_for
    from fortify.train import AdvBatch, get_objective

    net = create("small-cnn", num_classes=4, in_channels=1, width=4)
    model = attach_cas(net, ["features.1"], 4, (1, 8, 8)).train()
    block = next(iter(cas_blocks(model).values()))
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append(labels_for(m)))
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    obj = get_objective(objective, TrainConfig(objective=objective))
    loss, metrics = obj.compute(model, AdvBatch(x, y, x.clone()), None)
    assert "cas" in metrics and torch.isfinite(loss)
    assert seen and all(s is not None and torch.equal(s, y) for s in seen)
    model(x)  # outside the objective's passes: no labels
    assert seen[-1] is None
