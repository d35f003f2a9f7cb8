"""OOD readers (CIFAR-10-C layout, Tiny-ImageNet-C folders) and the ``ood`` evaluation suite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fortify.errors import ConfigError, DataError
from fortify.evaluate import ood, ood_readers


def _write_cifar_c(root, per: int, rows: int | None = None, label_rows: int | None = None):
    rng = np.random.default_rng(0)
    rows = 5 * per if rows is None else rows
    root.mkdir(parents=True, exist_ok=True)
    imgs = rng.integers(0, 256, size=(rows, 8, 8, 3), dtype=np.uint8)
    for s in range(5):  # severity s+1 images are constant s+1 in channel 0 (to check order)
        imgs[s * per : (s + 1) * per, 0, 0, 0] = s + 1
    np.save(root / "gaussian_noise.npy", imgs)
    labels = np.tile(np.arange(per) % 10, 5)[: (label_rows or rows)]
    np.save(root / "labels.npy", labels.astype(np.int64))


def test_read_cifar_c_severity_major(tmp_path):
    _write_cifar_c(tmp_path, per=20)
    sets = ood_readers.read_cifar_c(tmp_path, "gaussian_noise", per_severity=20)
    assert sorted(sets) == [1, 2, 3, 4, 5]
    for s, iset in sets.items():
        assert iset.images.shape == (20, 3, 8, 8) and iset.images.dtype == torch.uint8
        assert int(iset.images[0, 0, 0, 0]) == s
        assert iset.labels.tolist() == [i % 10 for i in range(20)]
    assert (
        ood_readers.read_cifar_c(tmp_path, "gaussian_noise", per_severity=20, limit=5)[
            3
        ].images.shape[0]
        == 5
    )
    assert ood_readers.list_cifar_c(tmp_path) == ["gaussian_noise"]


def test_read_cifar_c_wrong_rows_fail_clearly(tmp_path):
    _write_cifar_c(tmp_path / "a", per=20, rows=90)
    with pytest.raises(DataError, match=r"90 rows; expected 100 \(5 severities × 20"):
        ood_readers.read_cifar_c(tmp_path / "a", "gaussian_noise", per_severity=20)
    # the published layout expects 50,000 rows
    _write_cifar_c(tmp_path / "b", per=20)
    with pytest.raises(DataError, match="expected 50000"):
        ood_readers.read_cifar_c(tmp_path / "b", "gaussian_noise")
    with pytest.raises(DataError, match="not found.*gaussian_noise"):
        ood_readers.read_cifar_c(tmp_path / "b", "fog", per_severity=20)
    # images right, labels short
    _write_cifar_c(tmp_path / "c", per=20, label_rows=95)
    with pytest.raises(DataError, match=r"labels\.npy' has 95 rows; expected 100"):
        ood_readers.read_cifar_c(tmp_path / "c", "gaussian_noise", per_severity=20)
    # labels of the wrong shape, images of the wrong dtype
    _write_cifar_c(tmp_path / "d", per=20)
    np.save(tmp_path / "d" / "labels.npy", np.zeros((100, 2), np.int64))
    with pytest.raises(DataError, match=r"one integer label per row .*\(100, 2\)"):
        ood_readers.read_cifar_c(tmp_path / "d", "gaussian_noise", per_severity=20)
    _write_cifar_c(tmp_path / "e", per=20)
    np.save(tmp_path / "e" / "gaussian_noise.npy", np.zeros((100, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="uint8 images .*float32"):
        ood_readers.read_cifar_c(tmp_path / "e", "gaussian_noise", per_severity=20)


def test_read_tiny_imagenet_c(tmp_path):
    from PIL import Image

    classes = ["n01", "n02"]
    for ci, w in enumerate(classes):
        d = tmp_path / "fog" / "2" / w
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * ci + i, np.uint8)).save(d / f"{i}.JPEG")
    s = ood_readers.read_tiny_imagenet_c(tmp_path, "fog", 2, classes)
    assert s.images.shape == (6, 3, 8, 8) and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="not found"):
        ood_readers.read_tiny_imagenet_c(tmp_path, "fog", 4, classes)
    with pytest.raises(DataError, match="not one of the model's classes"):
        ood_readers.read_tiny_imagenet_c(tmp_path, "fog", 2, ["n01"])


def test_tiny_imagenet_c_is_read_from_the_cache_the_second_time(tmp_path, monkeypatch):
    from PIL import Image

    cache = tmp_path / "cache"
    classes = ["n01", "n02"]
    for ci, w in enumerate(classes):
        d = tmp_path / "data" / "fog" / "3" / w
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 50 * ci + 9 * i, np.uint8)).save(d / f"{i}.png")
    first = ood_readers.read_tiny_imagenet_c(tmp_path / "data", "fog", 3, classes, cache_dir=cache)
    sub = ood_readers.read_tiny_imagenet_c(
        tmp_path / "data", "fog", 3, classes, limit=5, cache_dir=cache
    )
    assert list(cache.glob("tiny-imagenet-c-fog-3-*.safetensors"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache was valid")

    monkeypatch.setattr(Image, "open", no_decoding)
    again = ood_readers.read_tiny_imagenet_c(tmp_path / "data", "fog", 3, classes, cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    sub2 = ood_readers.read_tiny_imagenet_c(
        tmp_path / "data", "fog", 3, classes, limit=5, cache_dir=cache
    )
    assert len(sub2) == 5 and torch.equal(sub2.images, sub.images)
    assert first.images[:, 0, 0, 0].tolist() == [0, 9, 18, 27, 50, 59, 68, 77]


class Const(nn.Module):
    """Predicts class 0 for every image."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10, device=x.device)
        out[:, 0] = 1.0
        return out + 0 * self.w


def test_published_and_generated_results(tmp_path):
    _write_cifar_c(tmp_path / "CIFAR-10-C", per=20)
    # per_severity is 10,000 in the published layout; use the reader directly with a small set
    res = ood.generated_ood(
        Const(),
        torch.rand(30, 1, 8, 8),
        torch.zeros(30, dtype=torch.long),
        corruptions=["contrast", "gaussian_noise"],
        severities=(1, 3),
    )
    assert res.table == {"contrast": {1: 100.0, 3: 100.0}, "gaussian_noise": {1: 100.0, 3: 100.0}}
    assert res.mean == 100.0 and res.per_severity == {1: 100.0, 3: 100.0}
    assert "| contrast |" in res.markdown()
    y = torch.tensor([0, 1] * 10)
    res = ood.generated_ood(Const(), torch.rand(20, 3, 8, 8), y, corruptions=["saturate"])
    assert res.per_corruption["saturate"] == 50.0 and res.clean == 50.0
    assert ood.find_published("cifar10", tmp_path) == tmp_path / "CIFAR-10-C"
    assert ood.find_published("fashion-mnist", tmp_path) is None


def test_ood_suite_through_the_registry():
    from fortify.evaluate import available_suites, evaluate

    assert "ood" in available_suites()
    torch.manual_seed(0)
    from fortify.models import create

    model = create("small-cnn", num_classes=10, in_channels=1, width=4).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    options = {"dataset": "digits", "corruptions": ["contrast", "pixelate"]}
    report = evaluate(model, x, y, suite="ood", eps=0.1, checks=False, suite_options=options)
    table = report.extras["ood"]
    assert set(table["per_corruption"]) == {"contrast", "pixelate"}
    assert 0 <= table["mean"] <= 100
    assert any(c.name == "OOD" for c in report.checks)
    assert report.settings["suite_options"]["corruptions"] == ["contrast", "pixelate"]
    with pytest.raises(ConfigError, match="OOD source"):
        evaluate(model, x, y, suite="ood", eps=0.1, suite_options={"source": "web"})
