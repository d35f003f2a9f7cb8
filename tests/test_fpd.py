"""FPD: the denoising operation, the wrapper (shapes, options, errors), the contract, training."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fortify.models.resnet  # noqa: F401  (registers the ResNets)
from fortify.config.schema import DefenseConfig, ModelConfig, TrainConfig
from fortify.defenses.contract import AuxContext, aux_providers, capture_aux
from fortify.defenses.fpd import FPD, build_fpd, denoise, middle_denoise
from fortify.defenses.registry import DefenceSpec
from fortify.errors import ConfigError, DataError, FortifyError
from fortify.factory import build_model
from fortify.models import create
from fortify.train.objectives import StepContext, get_objective


def _fpd(name: str = "small-resnet", shape=(1, 28, 28), width: int = 4, **options) -> FPD:
    kw = {"width": width}
    if "stem" in options:
        kw["stem"] = options.pop("stem")
    m = create(name, num_classes=10, in_channels=shape[0], **kw)
    opts = {"width": 8, **options}
    return build_fpd(m, DefenceSpec(name, [], opts, 10, shape))


# ---- the denoising operation ---------------------------------------------------------------


def _spatial(feat: torch.Tensor) -> torch.Tensor:
    """D computed the expensive way: the (H·W)×(H·W) affinity Fᵀ F."""
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w)
    affinity = f.transpose(1, 2) @ f  # (N, HW, HW)
    return feat + (f @ affinity).reshape(n, c, h, w) / (h * w)


def test_denoise_equals_spatial_form_float64():
    torch.manual_seed(0)
    feat = torch.randn(3, 7, 5, 6, dtype=torch.float64)
    out = denoise(feat)
    assert out.dtype == torch.float64 and out.shape == feat.shape
    torch.testing.assert_close(out, _spatial(feat), rtol=1e-12, atol=1e-12)
    # and it is not the identity: the non-local term matters
    assert (out - feat).abs().max() > 0.1


def test_denoise_nc_scale_divides_the_nonlocal_term_by_channels():
    torch.manual_seed(3)
    feat = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    expected = feat + (_spatial(feat) - feat) / 6
    torch.testing.assert_close(denoise(feat, "nc"), expected, rtol=1e-12, atol=1e-12)


def test_denoise_is_per_sample():
    torch.manual_seed(1)
    feat = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(denoise(feat)[2:3], denoise(feat[2:3]), rtol=0, atol=1e-13)


def test_middle_denoise_uses_the_source_gram():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    r = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(middle_denoise(r, x), r + (_spatial(x) - x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(middle_denoise(r, r), _spatial(r), rtol=1e-12, atol=1e-12)


# ---- the wrapper ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,stem",
    [
        ("small-resnet", (1, 28, 28), "cifar"),  # BasicBlock, no upsampling needed
        ("resnet18", (3, 40, 36), "imagenet"),  # two transposed convs, non-square
        ("resnet50", (3, 32, 32), "imagenet"),  # Bottleneck
        ("small-resnet", (1, 37, 35), "imagenet"),  # odd sizes: closed by interpolation
    ],
)
def test_restored_image_has_input_shape(name, shape, stem):
    torch.manual_seed(0)
    f = _fpd(name, shape, width=2, stem=stem).eval()
    x = torch.rand(2, *shape)
    out = f.forward_full(x)
    assert out.restored.shape == x.shape
    assert out.logits.shape == out.bounded.shape == (2, 10)
    assert f.restore(x).shape == x.shape
    y = f(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 10)


def test_bounded_output_is_tanh_of_unbounded_logits():
    torch.manual_seed(0)
    f = _fpd().eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        bounded, logits = f(x), f.unbounded_logits(x)
    assert bounded.abs().max() <= 1.0
    torch.testing.assert_close(bounded, torch.tanh(logits))


def test_backbone_is_shared_between_passes():
    f = _fpd()
    n_backbone = sum(p.numel() for p in f.net.parameters())
    n_decoder = sum(p.numel() for p in f.decoder.parameters())
    assert sum(p.numel() for p in f.parameters()) == n_backbone + n_decoder
    calls = []
    f.net.layer2.register_forward_hook(lambda *a: calls.append(1))
    f(torch.rand(2, 1, 28, 28))
    assert len(calls) == 2  # front pass and back pass


def _bn_means(f: FPD) -> dict[str, torch.Tensor]:
    return {
        n: m.running_mean.clone() for n, m in f.net.named_modules() if isinstance(m, nn.BatchNorm2d)
    }


def test_per_pass_bn_statistics():
    """The front pass updates the backbone's BN statistics, the back pass only its own copy."""
    import copy

    torch.manual_seed(0)
    f = _fpd(bn_stats="per-pass").train()
    front_only = copy.deepcopy(f)
    x = torch.rand(8, 1, 28, 28)
    f(x)
    front_only.restore(x)
    after, front = _bn_means(f), _bn_means(front_only)
    assert after.keys() == front.keys() and len(after) > 4
    for name in after:
        torch.testing.assert_close(after[name], front[name], rtol=0, atol=0)
    back = {k.replace("__", "."): v.running_mean for k, v in f.back_stats.items()}
    assert back.keys() == after.keys()
    assert all(back[n].abs().sum() > 0 for n in back)  # the back pass did update its copy
    assert any(not torch.equal(back[n], after[n]) for n in back)
    assert int(f.back_stats["bn1"].num_batches_tracked) == 1
    # eval mode: the back pass reads its own statistics, the front pass the backbone's
    f.eval()
    with torch.no_grad():
        restored, logits = f.restore(x), f.unbounded_logits(x)
        for stats in f.back_stats.values():
            stats.running_var.mul_(4.0)
        torch.testing.assert_close(f.restore(x), restored, rtol=0, atol=0)
        assert not torch.allclose(f.unbounded_logits(x), logits)


def test_defaults_are_the_release():
    f = _fpd()
    assert (f.bn_stats, f.denoise_scale, f.pyramid) == ("shared", "n", "raw")
    assert f.decoder.kind == "linear" and len(f.back_stats) == 0


_LEGACY = {"pyramid": "denoised", "decoder": "activated"}


def _legacy_state(**options) -> dict:
    """Weights as FPD saved them before the release structure: no fpd_format entry."""
    sd = _fpd(**_LEGACY, **options).state_dict()
    del sd["fpd_format"]
    return sd


def test_weights_without_back_pass_statistics_are_refused_with_the_way_out():
    old = _legacy_state(bn_stats="per-pass")
    del_keys = [k for k in old if k.startswith("back_stats.")]
    for k in del_keys:
        del old[k]
    with pytest.raises(RuntimeError, match="bn_stats: shared, denoise_scale: n"):
        _fpd(**_LEGACY, bn_stats="per-pass").load_state_dict(old, strict=False)
    _fpd(**_LEGACY, bn_stats="shared", denoise_scale="n").load_state_dict(old)


@pytest.mark.parametrize(
    "saved,hint",
    [
        ({"bn_stats": "per-pass", "denoise_scale": "nc"}, "bn_stats: per-pass, denoise_scale: nc"),
        ({"bn_stats": "shared", "denoise_scale": "n"}, "bn_stats: shared, denoise_scale: n"),
    ],
)
def test_pre_release_structure_weights_are_refused_naming_the_options(saved, hint):
    old = _legacy_state(**saved)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=f"pyramid: denoised, decoder: activated, {hint}"):
            _fpd().load_state_dict(old, strict=strict)
    f = _fpd(**_LEGACY, **saved)
    f.load_state_dict(old)  # the named options load them, and compute what they computed
    ref = _fpd(**_LEGACY, **saved)
    ref.load_state_dict({**old, "fpd_format": torch.tensor(2)})
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(f.eval()(x), ref.eval()(x))


def test_shared_bn_statistics_option_has_no_copies():
    f = _fpd(bn_stats="shared").train()
    assert len(f.back_stats) == 0
    before = int(f.net.bn1.num_batches_tracked)
    f(torch.rand(4, 1, 28, 28))
    assert int(f.net.bn1.num_batches_tracked) == before + 2  # both passes


def test_lateral_norm_option():
    f = _fpd(lateral_norm=True)
    assert all(isinstance(lat[1], nn.BatchNorm2d) for lat in f.decoder.laterals)
    assert f.restore(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("scale", ["nc", "n"])
def test_front_denoising_changes_the_features(scale):
    """D is applied after the stem and after layer1, in both passes, with the chosen scale."""
    torch.manual_seed(0)
    f = _fpd(denoise_scale=scale).eval()
    assert f.denoise_scale == scale
    seen: dict[str, list[torch.Tensor]] = {"stem": [], "in1": [], "out1": [], "in2": []}
    f.net.act.register_forward_hook(lambda m, a, o: seen["stem"].append(o))
    f.net.layer1[0].register_forward_pre_hook(lambda m, a: seen["in1"].append(a[0]))
    f.net.layer1[1].register_forward_hook(lambda m, a, o: seen["out1"].append(o))
    f.net.layer2.register_forward_pre_hook(lambda m, a: seen["in2"].append(a[0]))
    f(torch.rand(2, 1, 28, 28))
    assert len(seen["in1"]) == 2  # front and back pass
    for i in range(2):
        torch.testing.assert_close(seen["in1"][i], denoise(seen["stem"][i], scale))
        torch.testing.assert_close(seen["in2"][i], denoise(seen["out1"][i], scale))


def test_spectral_and_none_bounds():
    torch.manual_seed(0)
    f = _fpd(bound="spectral").eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(f(x), f.unbounded_logits(x))
        sigma = torch.linalg.matrix_norm(f.net.linear.weight, ord=2)
    assert sigma == pytest.approx(1.0, abs=0.05)
    g = _fpd(bound="none").eval()
    assert not torch.allclose(g(x), torch.tanh(g(x)))


def test_elu_option_replaces_every_relu():
    f = _fpd(activation="elu")
    assert not any(isinstance(m, nn.ReLU) for m in f.modules())
    assert any(isinstance(m, nn.ELU) for m in f.net.modules())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    f = _fpd(dropout=0.5)
    x = torch.rand(4, 1, 28, 28)
    f.eval()
    with torch.no_grad():
        assert torch.equal(f(x), f(x))
    f.train()
    with torch.no_grad():
        a, b = f.unbounded_logits(x), f.unbounded_logits(x)
    assert not torch.allclose(a, b)


def test_stages_option_on_a_non_resnet():
    m = create("small-cnn", num_classes=10, in_channels=1, width=4)
    f = build_fpd(
        m, DefenceSpec("small-cnn", ["features.0", "features.1"], {"width": 8}, 10, (1, 28, 28))
    )
    assert f(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_built_by_the_factory():
    model = build_model(
        ModelConfig(name="small-resnet", kwargs={"width": 4}),
        [DefenseConfig(kind="fpd", options={"width": 8})],
        num_classes=10,
        image_shape=(1, 28, 28),
    )
    assert isinstance(model, FPD)
    assert "net.layer2.1.conv2.weight" in dict(model.named_parameters())


# ---- bad input ------------------------------------------------------------------------------


def test_missing_stages_are_named():
    m = create("small-cnn", num_classes=10, in_channels=1, width=4)
    with pytest.raises(ConfigError, match=r"layer1.*not found.*features"):
        build_fpd(
            m, DefenceSpec("small-cnn", [], {"stages": ["layer1", "layer2"]}, 10, (1, 28, 28))
        )
    with pytest.raises(ConfigError, match="stage names"):
        build_fpd(m, DefenceSpec("small-cnn", [], {}, 10, (1, 28, 28)))


def test_too_small_input_names_the_minimum():
    f = _fpd()
    assert f.min_size == (8, 8)
    with pytest.raises(DataError, match=r"at least 8×8"):
        f(torch.rand(1, 1, 6, 6))
    with pytest.raises(DataError, match=r"\(N, 1, H, W\)"):
        f(torch.rand(1, 3, 28, 28))


@pytest.mark.parametrize(
    "name,shape,stem,minimum",
    [("small-resnet", (1, 4, 4), "cifar", 8), ("resnet18", (3, 16, 16), "imagenet", 32)],
)
def test_image_shape_below_the_total_stride_is_refused(name, shape, stem, minimum):
    """Built for inputs smaller than the total stride, every deep level would collapse to 1×1."""
    with pytest.raises(DataError, match=rf"{shape[1]}×{shape[2]} is smaller.*at least {minimum}×"):
        _fpd(name, shape, width=2, stem=stem)
    ok = (shape[0], minimum, minimum)
    assert _fpd(name, ok, width=2, stem=stem).min_size == (minimum, minimum)


def test_bad_options():
    with pytest.raises(ConfigError, match="bound"):
        _fpd(bound="sigmoid")
    with pytest.raises(ConfigError, match="unknown FPD option"):
        _fpd(thresh=1)
    with pytest.raises(ConfigError, match="bn_stats.*per-pass"):
        _fpd(bn_stats="both")
    with pytest.raises(ConfigError, match="denoise_scale.*'nc'"):
        _fpd(denoise_scale="c")
    for t in (0, -1.0):
        with pytest.raises(ConfigError, match="threshold"):
            get_objective("fpd", TrainConfig(objective="fpd", options={"threshold": t}))
    with pytest.raises(ConfigError, match="allowed"):
        get_objective("fpd", TrainConfig(objective="fpd", options={"treshold": 1.0}))


# ---- contract -------------------------------------------------------------------------------


def test_restoration_loss_through_the_contract():
    torch.manual_seed(0)
    f = _fpd(restore_weight=0.5)
    assert aux_providers(f) == [f.aux]
    x = torch.rand(2, 1, 28, 28)
    with capture_aux(f) as cap:
        logits = f(x)
        rec = dict(f.aux.recorded)
        terms = cap.losses(AuxContext(y=torch.tensor([0, 1]), logits=logits, x=x, x_clean=x))
    assert set(rec) == {"restored", "logits", "bounded"}
    expected = 0.5 * torch.nn.functional.mse_loss(rec["restored"], x)
    torch.testing.assert_close(terms["fpd_restore"], expected)
    f(x)
    assert f.aux.recorded == {}  # nothing recorded outside capture


# ---- two-phase training ---------------------------------------------------------------------


def _ctx(model: nn.Module, lr: float = 1e-2, epoch: int = 0) -> StepContext:
    cfg = TrainConfig(objective="fpd", optimizer="adam", lr=lr, grad_clip=5.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5)
    return StepContext(
        cfg=cfg,
        optimizer=opt,
        device=torch.device("cpu"),
        params=params,
        module=model,
        generator=torch.Generator().manual_seed(0),
        epoch=epoch,
    )


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _step(threshold: float, **opts):
    torch.manual_seed(0)
    f = _fpd()
    f.train()
    before = {n: p.detach().clone() for n, p in f.named_parameters()}
    obj = get_objective(
        "fpd", TrainConfig(objective="fpd", options={"threshold": threshold, **opts})
    )
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    metrics = obj.train_step(f, x, y, _ctx(f))
    return f, _changed(f, before), metrics


def test_phase1_updates_only_restoration_and_front():
    f, changed, metrics = _step(threshold=1e-9)  # L2 is far above T
    assert metrics["fpd_phase2"] == 0.0
    assert not any(n.startswith("net.linear") for n in changed)
    assert {n for n, _ in f.decoder.named_parameters(prefix="decoder")} <= changed
    assert "net.layer1.0.conv1.weight" in changed and "net.conv1.weight" in changed


def test_phase1_after_phase2_does_not_move_the_classifier():
    """Adam's momentum from a phase-2 step must not move the classifier in a phase-1 step."""
    torch.manual_seed(0)
    f = _fpd()
    f.train()
    ctx = _ctx(f)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    obj2 = get_objective("fpd", TrainConfig(objective="fpd", options={"threshold": 1e9}))
    obj2.train_step(f, x, y, ctx)
    before = {n: p.detach().clone() for n, p in f.named_parameters()}
    obj1 = get_objective("fpd", TrainConfig(objective="fpd", options={"threshold": 1e-9}))
    assert obj1.train_step(f, x, y, ctx)["fpd_phase2"] == 0.0
    changed = _changed(f, before)
    assert "net.linear.weight" not in changed and "net.linear.bias" not in changed
    assert "decoder.head.weight" in changed


def test_phase1_decoder_only_leaves_backbone_alone():
    f, changed, metrics = _step(threshold=1e-9, phase1_params="decoder")
    assert metrics["fpd_phase2"] == 0.0
    assert changed == {n for n, _ in f.decoder.named_parameters(prefix="decoder")}


def test_phase2_updates_everything_with_a_second_step():
    f, changed, metrics = _step(threshold=1e9)  # L2 is far below T
    assert metrics["fpd_phase2"] == 1.0
    assert {"ce", "ce2", "fpd_l2_2", "loss2"} <= set(metrics)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    assert {n for n, _ in f.named_parameters()} == changed


def test_second_step_is_a_fresh_forward():
    """The second step's input is the restoration by the *updated* model, not a stale tensor."""
    torch.manual_seed(0)
    f = _fpd()
    f.train()
    obj = get_objective(
        "fpd", TrainConfig(objective="fpd", options={"threshold": 1e9, "noise": 0.0})
    )
    inputs = []
    f.net.conv1.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    restored = []
    f.decoder.register_forward_hook(lambda m, a, o: restored.append(o.detach().clone()))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    obj.train_step(f, x, y, _ctx(f))
    # passes: [front, back] step 1; [front] fresh restore; [front, back] step 2
    assert len(inputs) == 5 and len(restored) == 3
    torch.testing.assert_close(inputs[3], restored[1])  # release: x′ fed back unclipped
    assert restored[1].min() < 0 or restored[1].max() > 1  # (so clipping would show)
    assert not torch.allclose(restored[1], restored[0])  # weights moved between them


def test_clamp_option_clips_noisy_and_fed_back_inputs():
    torch.manual_seed(0)
    f = _fpd().train()
    obj = get_objective(
        "fpd", TrainConfig(objective="fpd", options={"threshold": 1e9, "clamp": True})
    )
    inputs = []
    f.net.conv1.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    x = torch.rand(4, 1, 28, 28)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    obj.train_step(f, x, torch.randint(0, 10, (4,)), _ctx(f))
    assert 0 <= inputs[0].min() and inputs[0].max() <= 1  # x_noisy
    assert 0 <= inputs[3].min() and inputs[3].max() <= 1  # x′ fed back
    unclamped = get_objective("fpd", TrainConfig(objective="fpd", options={"threshold": 1e9}))
    inputs.clear()
    unclamped.train_step(f, x, torch.randint(0, 10, (4,)), _ctx(f))
    assert inputs[0].min() < 0 or inputs[0].max() > 1  # release: x + U(-δ, δ) not clipped


def test_phase1_has_its_own_optimiser_by_default():
    """The release steps phase 1 with a separate optimiser: the run's optimiser keeps no state
    for phase-1 steps, and the phase-1 optimiser holds only the phase-1 parameters."""
    torch.manual_seed(0)
    f = _fpd().train()
    ctx = _ctx(f)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    obj = get_objective("fpd", TrainConfig(objective="fpd", options={"threshold": 1e-9}))
    assert obj.train_step(f, x, y, ctx)["fpd_phase2"] == 0.0
    assert len(ctx.optimizer.state) == 0
    p1 = obj._phase1_opt
    assert p1 is not None and p1 is not ctx.optimizer
    ids = {id(p) for g in p1.param_groups for p in g["params"]}
    assert ids == {id(p) for p in f.phase1_parameters("front")}
    assert id(f.net.linear.weight) not in ids and len(p1.state) == len(ids)
    shared = get_objective(
        "fpd",
        TrainConfig(objective="fpd", options={"threshold": 1e-9, "phase1_optimizer": "shared"}),
    )
    shared.train_step(f, x, y, ctx)
    assert shared._phase1_opt is None and len(ctx.optimizer.state) == len(ids)
    with pytest.raises(ConfigError, match="phase1_optimizer"):
        get_objective("fpd", TrainConfig(objective="fpd", options={"phase1_optimizer": "own"}))


def test_warns_when_phase2_never_starts(caplog):
    torch.manual_seed(0)
    f = _fpd()
    f.train()
    obj = get_objective(
        "fpd", TrainConfig(objective="fpd", options={"threshold": 1e-9, "warn_after_epochs": 1})
    )
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with caplog.at_level(logging.WARNING, logger="fortify.train.objectives.fpd"):
        obj.train_step(f, x, y, _ctx(f, epoch=0))
        assert not caplog.records
        obj.train_step(f, x, y, _ctx(f, epoch=1))
    assert any("phase 2 never started" in r.getMessage() for r in caplog.records)


def test_find_fpd_error():
    from fortify.defenses.fpd import find_fpd

    with pytest.raises(FortifyError, match="fpd"):
        find_fpd(nn.Linear(2, 2))


@pytest.mark.parametrize("factor, phase2", [(1.02, 1.0), (0.98, 0.0)])
def test_gating_just_either_side_of_the_measured_l2(factor, phase2):
    """T set 2 % above / below the step's own restoration loss picks phase 2 / phase 1."""
    torch.manual_seed(0)
    f = _fpd()
    f.train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.no_grad():  # noise 0: the step sees exactly this restoration loss
        l2 = float(torch.nn.functional.mse_loss(f.restore(x), x))
    before = {n: p.detach().clone() for n, p in f.named_parameters()}
    obj = get_objective(
        "fpd",
        TrainConfig(objective="fpd", options={"threshold": factor * l2, "noise": 0.0}),
    )
    metrics = obj.train_step(f, x, y, _ctx(f))
    assert float(metrics["fpd_l2"]) == pytest.approx(l2, rel=1e-4)
    assert metrics["fpd_phase2"] == phase2
    head_moved = "net.linear.weight" in _changed(f, before)
    assert head_moved == (phase2 == 1.0)


def test_fpd_options_are_written_once():
    """FPDOptions holds the names, defaults and allowed values: the builder, the keyword
    arguments of FPD and ``options=`` agree, and every choice is checked by validate()."""
    from fortify.defenses.fpd_options import CHOICES, FPDOptions

    defaults = FPDOptions()
    assert (defaults.bound, defaults.middle, defaults.bn_stats, defaults.denoise_scale) == (
        "tanh", "input", "shared", "n"
    )  # fmt: skip
    assert (defaults.decoder, defaults.pyramid, defaults.width) == ("linear", "raw", 256)
    m = _fpd(bound="none", dropout=0.25)
    assert (m.bound, m.dropout, m.options.width) == ("none", 0.25, 8)
    backbone = create("small-resnet", num_classes=10, in_channels=1, width=4)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    via_options = FPD(backbone, stages, (1, 28, 28), options=FPDOptions(width=8), bound="none")
    assert via_options.options == FPDOptions(width=8, bound="none")
    for name, allowed in CHOICES.items():
        assert getattr(defaults, name) in allowed
        with pytest.raises(ConfigError, match=f"FPD option {name}='bad' is not allowed"):
            FPDOptions(**{name: "bad"}).validate()
    with pytest.raises(ConfigError, match=r"unknown FPD option\(s\) \['bond'\]"):
        _fpd(bond="none")
