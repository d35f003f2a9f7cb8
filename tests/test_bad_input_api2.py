"""Bad input to the public Python API found by a second audit (attacks, evaluate, compare, the
AutoAttack adapter, stats, the model factory, FPD, datasets and loaders): each case raises a
fortify error naming what was wrong and what is allowed, instead of a raw PyTorch/Python error,
a warning or a silently wrong result."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_runs import tiny_cnn
from torch import nn

from fortify import stats
from fortify.attacks import FGSM, PGD, PGDOptions, fgsm, fgsm_attack, pgd, pgd_attack
from fortify.errors import ComparisonError, ConfigError, DataError, EvaluationError
from fortify.evaluate import compare_reports, evaluate, evaluate_split

EPS = 0.1


def _cnn(k: int = 3) -> nn.Module:
    return tiny_cnn(k)


class _Out(nn.Module):
    """``_cnn()`` with its logits passed through ``change``."""

    def __init__(self, change, k: int = 3) -> None:
        super().__init__()
        self.net, self.change = _cnn(k), change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.change(self.net(x))


@pytest.fixture()
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0])


ATTACKS = {
    "pgd": lambda m, x, y: pgd(m, x, y, eps=EPS, steps=2),
    "pgd_attack": lambda m, x, y: pgd_attack(m, x, y, eps=EPS, steps=2),
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=EPS),
    "fgsm_attack": lambda m, x, y: fgsm_attack(m, x, y, eps=EPS),
}
WITH_EVAL = {
    **ATTACKS,
    "evaluate": lambda m, x, y: evaluate(m, x, y, eps=EPS, suite="quick", checks=False),
}


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_refuse_a_single_logit(attack, xy):
    """Before: a model with one logit was attacked (CE is constant: no gradient, never fooled)."""
    x, _ = xy
    with pytest.raises(EvaluationError, match=r"1 logit\(s\) per image.*K >= 2"):
        ATTACKS[attack](_Out(lambda z: z[:, :1]), x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("attack", sorted(WITH_EVAL))
def test_logits_on_another_device_are_named(attack, xy):
    """Before: a raw ``RuntimeError`` from deep inside torch (``Tensor.item()`` on meta)."""
    with pytest.raises(EvaluationError, match="logits on device meta for images on cpu"):
        WITH_EVAL[attack](_Out(lambda z: z.to("meta")), *xy)


@pytest.mark.parametrize(
    "change, words",
    [(lambda z: z > 0, "torch.bool"), (lambda z: z.to(torch.complex64), "torch.complex64")],
    ids=["bool", "complex"],
)
def test_evaluate_refuses_logits_that_are_not_float(change, words, xy):
    """Before: ``RuntimeError: argmax(): does not support bool/complex input``."""
    with pytest.raises(EvaluationError, match=f"logits of dtype {words}.*float logits"):
        evaluate(_Out(change), *xy, eps=EPS, suite="quick", checks=False)


def test_need_success_must_be_a_bool(xy):
    with pytest.raises(ConfigError, match="need_success must be True or False.*'no'"):
        pgd_attack(_cnn(), *xy, eps=EPS, steps=1, need_success="no")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda m: PGD(m, eps=-1.0), r"eps \(linf.*got -1.0"),
        (lambda m: PGD(m, steps=0), "steps must be an integer >= 1, got 0"),
        (lambda m: PGD(m, step_size=float("nan")), "step_size.*nan"),
        (lambda m: PGD(m, norm="l1"), "unknown norm 'l1'"),
        (lambda m: FGSM(m, eps="0.1"), r"eps \(linf.*'0.1'"),
    ],
)
def test_attack_classes_refuse_bad_settings_when_built(make, words):
    """Before: the object was built and the error came at the first call."""
    with pytest.raises(ConfigError, match=words):
        make(_cnn())


def test_attack_classes_refuse_bad_settings_when_set(xy):
    atk = PGD(_cnn(), eps=EPS, steps=2)
    with pytest.raises(ConfigError, match=r"eps.*got -1"):
        atk.eps = -1
    with pytest.raises(ConfigError, match="options must be an AttackOptions.*dict"):
        atk.options = {"eps": EPS}
    assert atk.eps == EPS  # unchanged, still usable
    atk.options = PGDOptions(eps=0.2, steps=1)
    assert atk(*xy).shape == xy[0].shape


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("shape", [(4, 0, 8, 8), (4, 1, 0, 8)])
def test_evaluate_refuses_images_without_pixels(shape):
    """Before: ``RuntimeError: min(): Expected reduction dim to be specified``."""
    with pytest.raises(DataError, match=r"x is empty.*C, H, W >= 1"):
        evaluate(_cnn(), torch.rand(shape), torch.zeros(4, dtype=torch.long), eps=EPS)


def test_evaluate_refuses_complex_labels(xy):
    """Before: cast to int64 silently (with a torch warning)."""
    x, y = xy
    with pytest.raises(DataError, match="integer class labels.*complex64"):
        evaluate(_cnn(), x, y.to(torch.complex64), eps=EPS, suite="quick", checks=False)


def test_evaluate_takes_images_that_require_grad_quietly(xy):
    """Before: a UserWarning from converting a tensor that requires grad to a number."""
    x, y = xy
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(_cnn(), x, y, eps=EPS, suite="quick", checks=False)
    assert x.requires_grad and x.grad is None


def test_evaluate_refuses_a_model_without_data(xy):
    """Before: ``RuntimeError: Tensor.item() cannot be called on meta tensors``."""
    with pytest.raises(ConfigError, match="'meta' device"):
        evaluate(_cnn().to("meta"), *xy, eps=EPS, suite="quick", checks=False)


@pytest.mark.parametrize("n_points", ["3", 2.5, True, -1])
def test_evaluate_split_checks_n_points(n_points):
    """Before: TypeError for "3" / 2.5 and one point for True."""
    from fortify.data.base import ImageSet

    data = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ConfigError, match=f"n_points must be an integer >= 1.*{n_points!r}"):
        evaluate_split(_cnn(), data, n_points, eps=EPS, suite="quick", checks=False)


# ----------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def reports():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0])
    kw = dict(eps=EPS, suite="quick", checks=False)
    return evaluate(_cnn(), x, y, **kw), evaluate(_cnn(), x, y, seed=1, **kw)


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("bad", [None, {"settings": {}}], ids=["None", "dict"])
def test_compare_refuses_what_is_not_a_report(which, bad, reports):
    """Before: ``AttributeError: ... has no attribute 'settings'``."""
    args = list(reports)
    args[which] = bad
    label = "AB"[which]
    with pytest.raises(
        ComparisonError, match=f"{label} must be an EvalReport.*{type(bad).__name__}"
    ):
        compare_reports(*args)


@pytest.mark.parametrize("labels", [("A",), None, ("A", "A"), ("A", 1), "AB", ("", "B")])
def test_compare_labels_are_two_names(labels, reports):
    """Before: unpacking errors (one label, None) or a table with two equal labels."""
    with pytest.raises(ComparisonError, match="labels must be two different non-empty names"):
        compare_reports(*reports, labels=labels)
    assert compare_reports(*reports, labels=["old", "new"]).rows


# ----------------------------------------------------------------------------- AutoAttack


def _aa(**kw):
    from fortify.evaluate.autoattack import StandardAutoAttack

    args = dict(num_classes=5, norm="linf", eps=EPS, seed=0, device="cpu")
    args.update(kw)
    net = args.pop("net", _cnn(5))
    return StandardAutoAttack(net, **args)


def _square(**kw):
    from fortify.evaluate.autoattack import Square

    args = dict(norm="linf", eps=EPS, queries=5, seed=0, device="cpu", rescale_schedule=True)
    args.update(kw)
    net = args.pop("net", _cnn(5))
    return Square(net, **args)


@pytest.mark.parametrize("make", [_aa, _square], ids=["AutoAttack", "Square"])
@pytest.mark.parametrize(
    "kw, words",
    [
        ({"norm": "l1"}, "unknown norm 'l1'; allowed: linf, l2"),
        ({"eps": -0.1}, r"eps \(linf, pixel units\).*\(0, 1\], got -0.1"),
        ({"eps": float("nan")}, r"eps.*got nan"),
        ({"eps": "0.1"}, r"eps.*got '0.1'"),
        ({"eps": 2.0}, r"eps.*got 2.0"),
        ({"seed": -1}, r"seed.*\[0, 2\*\*63 - 1\].*-1"),
        ({"net": None}, "net must be an nn.Module.*NoneType"),
    ],
)
def test_autoattack_adapter_checks_the_threat_model(make, kw, words):
    """Before: KeyError for the norm, TypeError deep in pyautoattack for a str ε, and a
    negative or NaN ε / seed / missing net accepted."""
    with pytest.raises(ConfigError, match=words):
        make(**kw)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"num_classes": "5"}, "num_classes.*>= 1.*'5'"),
        ({"num_classes": 5.0}, "num_classes.*>= 1.*5.0"),
    ],
)
def test_autoattack_needs_an_integer_class_count(kw, words):
    with pytest.raises(ConfigError, match=words):
        _aa(**kw)


@pytest.mark.parametrize(
    "kw, words",
    [({"queries": 0}, "queries.*>= 1.*0"), ({"rescale_schedule": "yes"}, "rescale_schedule")],
)
def test_square_checks_its_budget(kw, words):
    with pytest.raises(ConfigError, match=words):
        _square(**kw)


@pytest.mark.parametrize("make", [_aa, _square], ids=["AutoAttack", "Square"])
@pytest.mark.parametrize(
    "batch, words",
    [
        (lambda x, y: (x * float("nan"), y), "NaN pixels"),
        (lambda x, y: (x[:, 0], y), r"\(N, C, H, W\).*\(4, 8, 8\)"),
        (lambda x, y: (x, y.float()), "integer class indices.*float32"),
        (lambda x, y: (x, y[:2]), r"y must be an int64 tensor of shape \(4,\), got \(2,\)"),
        (lambda x, y: (x[:0], y[:0]), "no pixels"),
        (lambda x, y: (x * 2, y), r"pixel values in \[0, 1\]"),
    ],
)
def test_autoattack_adapter_checks_its_batch(make, batch, words, xy):
    """Before: NaN images attacked silently, raw RuntimeErrors from inside pyautoattack."""
    with pytest.raises(DataError, match=words):
        make()(*batch(*xy))


def test_autoattack_refuses_labels_beyond_its_classes(xy):
    """Before: labels >= K were attacked silently."""
    x, y = xy
    with pytest.raises(DataError, match=r"\[0, 5\), got 7"):
        _aa()(x, y + 5)


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize(
    "values, words",
    [
        (torch.tensor(1.0), "Tensor of shape ()"),
        (torch.zeros(2, 2), r"Tensor of shape \(2, 2\)"),
        ({1: 2.0}, "got dict"),
    ],
)
def test_mean_sd_needs_a_flat_list(values, words):
    """Before: TypeError (0-d tensor), a message about a row (2-D) or the dict's keys used."""
    with pytest.raises(DataError, match=f"mean_sd needs a list.*{words}"):
        stats.mean_sd(values)


def test_outcome_errors_name_the_argument_and_its_type():
    with pytest.raises(DataError, match=r"a must be a 1-D array.*got NoneType"):
        stats.paired_bootstrap(None, [1, 0])
    with pytest.raises(DataError, match=r"a_per_seed\[1\] must be a 1-D array"):
        stats.seed_point_bootstrap([[1, 0], 1], [[1, 0], [0, 1]])


# ----------------------------------------------------------------------------- model factory


def _model_cfg():
    from fortify.config.schema import ModelConfig

    return ModelConfig("small-cnn", {"width": 4})


@pytest.mark.parametrize(
    "args, words",
    [
        (lambda m, d: (None, [], 3, (1, 8, 8)), "model_cfg must be a ModelConfig.*NoneType"),
        (
            lambda m, d: ({"name": "small-cnn"}, [], 3, (1, 8, 8)),
            "model_cfg must be a ModelConfig.*dict",
        ),
        (lambda m, d: (m, None, 3, (1, 8, 8)), "defenses must be a list.*None"),
        (lambda m, d: (m, [{"kind": "fsr"}], 3, (1, 8, 8)), "DefenseConfig entries.*'fsr'"),
        (lambda m, d: (m, [d("fsr", "layer4")], 3, (1, 8, 8)), "at must be a list.*'layer4'"),
        (lambda m, d: (m, [], 3, (8, 8)), r"image_shape must be \(C, H, W\).*\(8, 8\)"),
        (lambda m, d: (m, [], 3, (1, 0, 8)), r"image_shape.*\(1, 0, 8\)"),
        (lambda m, d: (m, [], 3, (1, 8.5, 8)), r"image_shape.*8\.5"),
        (lambda m, d: (m, [], 3, None), "image_shape.*None"),
    ],
)
def test_build_model_checks_its_arguments(args, words):
    """Before: AttributeError/TypeError, the characters of a string ``at`` as module names,
    or a silently wrong model (``image_shape=(8, 8)`` built a network for 8 channels)."""
    from fortify.config.schema import DefenseConfig
    from fortify.factory import build_model

    with pytest.raises(ConfigError, match=words):
        build_model(*args(_model_cfg(), DefenseConfig))


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"mean": 0.5, "std": 0.2}, "mean must be a list of 1 number.*0.5"),
        ({"mean": [True], "std": [1.0]}, r"mean values must be finite numbers.*\[True\]"),
        ({"load_weights": "no"}, "load_weights must be True or False.*'no'"),
    ],
)
def test_create_checks_normalisation_and_flags(kw, words):
    """Before: TypeError (``len()`` of a float), True taken as a mean of 1, "no" as True."""
    from fortify.models import create

    with pytest.raises(ConfigError, match=words):
        create("small-cnn", 3, 1, width=4, **kw)


def _small_resnet() -> nn.Module:
    from fortify.models import create

    return create("small-resnet", num_classes=3, in_channels=1, width=4)


STAGES = ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "args, kw, words",
    [
        (lambda b: (None, STAGES, (1, 32, 32)), {}, "backbone as an nn.Module.*NoneType"),
        (lambda b: (b, None, (1, 32, 32)), {}, "stages must be a list of module names.*None"),
        (lambda b: (b, "layer1", (1, 32, 32)), {}, "stages must be a list.*'layer1'"),
        (lambda b: (b, STAGES, None), {}, r"image_shape must be \(C, H, W\).*None"),
        (lambda b: (b, STAGES, (1, 32.0, 32)), {}, r"image_shape.*32\.0"),
        (lambda b: (b, STAGES, (1, 32, 32)), {"options": {"width": 4}}, "FPDOptions, got dict"),
    ],
)
def test_fpd_checks_its_arguments(args, kw, words):
    """Before: AttributeError/TypeError, or a string's characters taken as stage names."""
    from fortify.defenses.fpd import FPD

    with pytest.raises(ConfigError, match=words):
        FPD(*args(_small_resnet()), **kw)


# ----------------------------------------------------------------------------- data


def _images(n: int = 6) -> torch.Tensor:
    return torch.zeros(n, 1, 8, 8, dtype=torch.uint8)


@pytest.mark.parametrize(
    "images, labels, words",
    [
        (lambda: _images().tolist(), lambda: torch.arange(6) % 3, "images must be a torch.Tensor"),
        (_images, lambda: [0, 1, 2, 0, 1, 2], "labels must be a torch.Tensor, got list"),
        (_images, lambda: torch.arange(6) * 0.5, "integer class indices.*float32"),
        (_images, lambda: torch.arange(6) % 2 == 0, "integer class indices.*bool"),
        (_images, lambda: torch.arange(6) - 1, "class indices >= 0, got -1"),
    ],
)
def test_image_set_checks_its_labels(images, labels, words):
    """Before: AttributeError for lists, and fractional (0.5 → 0), boolean or negative labels
    kept silently."""
    from fortify.data.base import ImageSet

    with pytest.raises(DataError, match=words):
        ImageSet(images(), labels())


@pytest.mark.parametrize("n", [-1, 2.5, "2", True])
def test_image_set_head_takes_a_count(n):
    """Before: ``head(-1)`` silently dropped the last item; TypeError for 2.5 / "2"."""
    from fortify.data.base import ImageSet

    data = ImageSet(_images(), torch.arange(6) % 3)
    with pytest.raises(DataError, match=f"None \\(all\\) or an integer >= 0, got {n!r}"):
        data.head(n)
    assert len(data.head(0)) == 0 and len(data.head(None)) == 6


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        ({"batch_size": True}, DataError, "batch_size must be an integer >= 1, got True"),
        ({"rank": True, "world_size": 2}, DataError, "rank must be an integer in.*True"),
        ({"shuffle": "no"}, DataError, "shuffle must be True or False, got 'no'"),
        ({"drop_last": "no"}, DataError, "drop_last must be True or False, got 'no'"),
        ({"seed": "a"}, DataError, "seed must be an integer, got 'a'"),
        ({"seed": 1.5}, DataError, "seed must be an integer, got 1.5"),
        ({"device": "gpu"}, ConfigError, "device 'gpu' is not a device.*allowed: auto"),
    ],
)
def test_tensor_loader_checks_its_options(kw, exc, words):
    """Before: bools taken as counts, truthy strings as flags, 1.5 truncated, ValueError for a
    seed "a" and a raw RuntimeError for an unknown device."""
    from fortify.data.base import ImageSet
    from fortify.data.loader import TensorLoader

    args = {"batch_size": 2, "shuffle": True, **kw}
    with pytest.raises(exc, match=words):
        TensorLoader(ImageSet(_images(), torch.arange(6) % 3), **args)


def test_tensor_loader_epoch_is_a_count():
    from fortify.data.base import ImageSet
    from fortify.data.loader import TensorLoader

    loader = TensorLoader(ImageSet(_images(), torch.arange(6) % 3), 2, shuffle=True)
    with pytest.raises(DataError, match="epoch must be an integer >= 0, got True"):
        loader.set_epoch(True)
    loader.set_epoch(1)
    assert sum(len(y) for _, y in loader) == 6


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        ({"val_size": "10"}, DataError, "val_size must be an integer >= 0, got '10'"),
        ({"val_size": 1.5}, DataError, "val_size must be an integer >= 0, got 1.5"),
        ({"val_size": None}, DataError, "val_size must be an integer >= 0, got None"),
        ({"train_subset": 2.5}, DataError, "train_subset must be None.*integer >= 1, got 2.5"),
        ({"test_subset": "5"}, DataError, "test_subset must be None.*got '5'"),
        ({"split_seed": "a"}, ConfigError, r"split_seed must be an integer in \[0, .*'a'"),
        ({"split_seed": 1.5}, ConfigError, "split_seed.*1.5"),
        ({"split_seed": -1}, ConfigError, "split_seed.*-1"),
        ({"download": "no"}, DataError, "download must be True or False, got 'no'"),
    ],
)
def test_load_dataset_checks_its_numbers(kw, exc, words):
    """Before: TypeError / raw RuntimeError from ``manual_seed``, a negative split seed used
    as is (the config refuses it) and "no" taken as True."""
    from fortify.data import load_dataset

    with pytest.raises(exc, match=words):
        load_dataset("digits", **kw)


# ------------------------------------------------------------ NumPy / 0-d tensor numbers


def test_numpy_and_zero_d_tensor_budgets_are_numbers_not_errors() -> None:
    """``np.float32(0.25)``, ``np.int64(3)`` and ``torch.tensor(0.25)`` are the numbers they hold
    (a user's ε often comes out of NumPy); a 0-d tensor that needs grad, or NaN, is refused."""
    import numpy as np

    net = _cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    ref = pgd(net, x, y, eps=0.25, steps=3, random_start=False)
    for eps, steps in ((np.float32(0.25), np.int64(3)), (torch.tensor(0.25), 3)):
        out = pgd(net, x, y, eps=eps, steps=steps, random_start=False)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        assert torch.equal(PGD(net, eps=eps, steps=steps, random_start=False)(x, y), ref)
    assert torch.equal(fgsm(net, x, y, eps=np.float64(0.25)), fgsm(net, x, y, eps=0.25))
    report = evaluate(net, x, y, eps=np.float32(0.25), suite="quick", checks=False)
    assert report.settings["eps"] == 0.25
    with pytest.raises(ConfigError, match="eps"):
        pgd(net, x, y, eps=np.float32("nan"), steps=3)
    with pytest.raises(ConfigError, match="eps"):
        pgd(net, x, y, eps=torch.tensor(0.25, requires_grad=True), steps=3)


# ------------------------------------------------------------ hand-edited report JSON


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["outcomes"][0].update(correct=5), "packed bits"),
        (lambda d: d["outcomes"][0].update(ran=[1, 0]), "packed bits"),
        (lambda d: d["outcomes"][0].update(mode=["final"]), "'mode' must be a string"),
        (lambda d: d["outcomes"][0].update(name={"a": 1}), "'name' must be a string"),
        (lambda d: d["outcomes"][0].update(ensemble="yes"), "'ensemble' must be a boolean"),
    ],
    ids=["correct-number", "ran-list", "mode-list", "name-object", "ensemble-string"],
)
def test_hand_edited_report_fields_are_named(tmp_path, edit, words) -> None:
    import json

    from fortify.evaluate import EvalReport

    net = _cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    _, path = evaluate(net, x, y, eps=EPS, suite="quick", checks=False).save(tmp_path)
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=words):
        EvalReport.load(path)


def test_a_report_nested_too_deeply_is_a_data_error(tmp_path) -> None:
    from fortify.evaluate import EvalReport

    path = tmp_path / "eval.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        EvalReport.load(path)


@pytest.mark.parametrize("value", ["yes", 1, "no"])
def test_evaluate_progress_is_a_flag(value) -> None:
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="progress must be True, False or None"):
        evaluate(_cnn(), x, y, eps=EPS, suite="quick", checks=False, progress=value)
