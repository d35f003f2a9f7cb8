"""Analysis helpers: parameter / FLOP counts, k-NN, FSR feature analysis and mask plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.analysis.cost import cost_report, count_call_flops, count_flops, count_params
from fortify.analysis.features import (
    block_features,
    feature_analysis,
    pick_block,
    use_part,
    weighted_knn,
)
from fortify.analysis.masks import plot_masks
from fortify.defenses.fsr import attach_fsr
from fortify.errors import FortifyError


def tiny_model(k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, stride=2, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, k),
    )
    return attach_fsr(net, "4", k, (1, 8, 8), hidden=4)


def test_params_and_flops_by_hand():
    model = tiny_model()
    rep = cost_report(model, (1, 8, 8))
    backbone = 4 * 9 + 8 + 8 * 4 * 9 + 8 * 3 + 3
    fsr = 2 * (8 * 4 * 9 + 8 + 4 * 4 * 9 + 8 + 4 * 8 * 9) + 8 * 3 + 3
    assert rep.params_backbone == backbone
    assert rep.params_total == backbone + fsr == count_params(model)
    # conv FLOPs = 2·MACs: conv1 8·8·4·9, conv2 4·4·8·36, linear 8·3; FSR convs at 4×4
    bb_flops = 2 * (64 * 4 * 9 + 16 * 8 * 36 + 8 * 3)
    fsr_flops = 2 * 2 * 16 * (8 * 4 * 9 + 4 * 4 * 9 + 4 * 8 * 9)
    assert rep.flops_backbone == bb_flops
    assert rep.flops_defences == {"net.4": fsr_flops}
    assert rep.flops_total == count_flops(model, torch.zeros(1, 1, 8, 8))
    assert "GFLOPs" in rep.table()


def test_call_flops_count_input_gradients_by_hand():
    # Linear (N=5, 7 → 3): forward 2·5·7·3; the gradient w.r.t. the input only is one more
    # product of the same size (no weight gradient is asked for)
    lin = nn.Linear(7, 3)
    x = torch.rand(5, 7, requires_grad=True)

    def input_gradient() -> None:
        torch.autograd.grad(lin(x).sum(), x)

    assert count_call_flops(input_gradient) == 2 * (2 * 5 * 7 * 3)

    def inference() -> None:  # composite ops reach the counter undecomposed here
        with torch.inference_mode():
            lin(x)

    assert count_call_flops(inference) == 2 * 5 * 7 * 3

    # CPU fused attention (B=2, P=16, d=8): forward QKᵀ and AV = 2·(2·2·16·16·8); the fused
    # gradient w.r.t. q, k, v executes five such products (QKᵀ recomputed, dP, dV, dQ, dK) —
    # both formulas are registered by fortify
    q, k, v = (torch.rand(2, 16, 8, requires_grad=True) for _ in range(3))
    product = 2 * 2 * 16 * 16 * 8

    def attention() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out.sum(), (q, k, v))

    assert count_call_flops(attention) == 2 * product + 5 * product


def test_weighted_knn():
    mem = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    lab = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert weighted_knn(mem, lab, q, k=2, num_classes=2).tolist() == [0, 1]
    # k = 3 still follows the closer (heavier) neighbours
    assert weighted_knn(mem, lab, q, k=3, num_classes=2).tolist() == [0, 1]
    with pytest.raises(FortifyError, match="k must be"):
        weighted_knn(mem, lab, q, k=9, num_classes=2)


def test_block_features_and_use_part():
    model = tiny_model().eval()
    name, blk = pick_block(model)
    assert name == "net.4"
    x = torch.rand(5, 1, 8, 8)
    feats = block_features(model, blk, x)
    assert set(feats) == {"f+", "f-", "f~-", "f~-+f+"}
    assert feats["f+"].shape == (5, 8)
    torch.testing.assert_close(feats["f~-+f+"], feats["f+"] + feats["f~-"])
    with torch.no_grad():
        full = model(x)
        with use_part(blk, "f_pos"):
            pos = model(x)
        f = torch.relu(model.net[:4](x))  # net.4 (ReLU) carries the hook; apply it by hand
        torch.testing.assert_close(pos, model.net[5:](blk.parts(f).f_pos))
    assert not torch.equal(full, pos)
    with pytest.raises(FortifyError, match="no FSR block"):
        pick_block(model, "net.1")


def test_feature_analysis_and_masks(tmp_path):
    model = tiny_model()
    torch.manual_seed(1)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 3, (12,))
    xm, ym = torch.rand(30, 1, 8, 8), torch.randint(0, 3, (30,))
    rep = feature_analysis(
        model, x, y, xm, ym, num_classes=3, eps=0.1, attack="pgd", steps=3, ks=(1, 5)
    )
    assert set(rep.adv_acc) == {"f+", "f-", "f~-", "f~-+f+"}
    assert rep.columns == ["PGD-3"] and rep.attack == "PGD-3 (random start)"
    for v in rep.adv_acc:
        assert 0 <= rep.adv_acc[v]["PGD-3"] <= rep.clean_acc[v] and set(rep.knn_acc[v]) == {1, 5}
    assert "5-NN" in rep.table() and "PGD-3 (random start)" in rep.table()
    with pytest.raises(FortifyError, match="AutoAttack.*>= 4 classes.*'ensemble' or 'pgd'"):
        feature_analysis(model, x, y, xm, ym, num_classes=3, eps=0.1)
    with pytest.raises(FortifyError, match="unknown feature-analysis attack 'fgsm'"):
        feature_analysis(model, x, y, xm, ym, num_classes=3, eps=0.1, attack="fgsm")
    summary = plot_masks(model, x[:3], x[:3].clamp(0.05, 0.95), y[:3], tmp_path / "masks.png")
    assert (tmp_path / "masks.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= summary["mean_mask_adv"] <= 1


def _quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8×8 images whose class (0-3) is the bright quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 0.6
    return x, y


def test_feature_analysis_defaults_to_the_slides_attacks():
    """The default classification attacks are the slides' (Ensemble and AutoAttack), in the
    Python API and in ``fortify analyze``."""
    import argparse
    import inspect

    from fortify.analysis.features import ATTACKS
    from fortify.cli import cmd_analyze

    assert inspect.signature(feature_analysis).parameters["attack"].default == "paper"
    assert "Ensemble" in ATTACKS["paper"] and "AutoAttack" in ATTACKS["paper"]
    parser = argparse.ArgumentParser()
    cmd_analyze.add_arguments(parser)
    assert parser.parse_args(["run"]).attack == "paper"


def test_feature_analysis_under_the_paper_suite_matches_evaluate():
    """``attack="ensemble"`` (the paper suite's Ensemble column; the default adds AutoAttack)
    on a trained 4-class model: the report names the attack, and the full-model row equals a
    direct evaluation of the model with the same suite."""
    import torch.nn.functional as F

    from fortify.evaluate import evaluate

    model = tiny_model(k=4)
    xt, yt = _quadrant_data(128, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):  # a model that attacks can break (a random one predicts one class)
        opt.zero_grad()
        F.cross_entropy(model.train()(xt), yt).backward()
        opt.step()
    model.eval()
    x, y = _quadrant_data(8, 1)
    xm, ym = _quadrant_data(16, 2)
    eps = 0.25
    rep = feature_analysis(
        model, x, y, xm, ym, num_classes=4, eps=eps, attack="ensemble", steps=3, ks=(1,)
    )
    assert rep.columns == ["Ensemble"] and rep.attack.startswith("Ensemble (FGSM, PGD-20")
    assert "white-box as that network with Ensemble" in rep.table()
    for v, accs in rep.adv_acc.items():
        assert 0 <= accs["Ensemble"] <= rep.clean_acc[v]
    assert rep.clean_acc["f~-+f+"] > 50
    direct = evaluate(model, x, y, suite="paper", eps=eps, checks=False).table()["final"]
    assert rep.adv_acc["f~-+f+"]["Ensemble"] == pytest.approx(direct["Ensemble"])
    assert rep.adv_acc["f~-+f+"]["Ensemble"] < rep.clean_acc["f~-+f+"]  # the attacks bite
