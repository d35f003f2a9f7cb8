"""Readers on tiny fake datasets written in each real on-disk format, plus their error paths."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from fortify.data import available, load_dataset, split_validation
from fortify.data.base import ImageSet
from fortify.data.readers._common import per_class_split
from fortify.data.readers.mnist import read_idx
from fortify.data.registry import reader_options
from fortify.errors import DataError, FortifyError

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- IDX (MNIST)
def idx_bytes(arr: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(np.uint8).tobytes()
    )


def write_idx_set(folder: Path, n_train=30, n_test=12, gz=True, hw=(28, 28)) -> dict:
    """Images whose pixel (0,0) is the index and pixel (0,1) is 1 (train) or 2 (test)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, flag in (("train", n_train, 1), ("t10k", n_test, 2)):
        x = RNG.integers(0, 256, (n, *hw), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        x[:, 0, 1] = flag
        y = np.arange(n) % 10
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            name = f"{split}-{kind}-idx{dims}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_idx_layouts(tmp_path, gz, layout):
    truth = write_idx_set(tmp_path / layout, gz=gz)
    s = load_dataset("fashion-mnist", str(tmp_path), val_size=6)
    assert s.num_classes == 10 and s.default_eps == pytest.approx(0.1)
    assert s.default_augment == "none" and s.classes[0] == "T-shirt/top"
    assert s.image_shape == (1, 28, 28) and s.train.images.dtype == torch.uint8
    assert len(s.train) == 24 and len(s.val) == 6 and len(s.test) == 12
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(truth["t10k"][0]))
    assert torch.equal(s.test.labels, torch.from_numpy(truth["t10k"][1]).long())
    # train + val is exactly the training file, in some order, and never test images
    ids = torch.cat([s.train.images[:, 0, 0, 0], s.val.images[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(30, dtype=torch.uint8))
    assert (s.val.images[:, 0, 0, 1] == 1).all()


def test_mnist_defaults_and_search_order(tmp_path):
    write_idx_set(tmp_path / "mnist", n_train=20)
    write_idx_set(tmp_path, n_train=25)  # root itself comes first in the search order
    s = load_dataset("mnist", str(tmp_path), val_size=5)
    assert s.default_eps == pytest.approx(0.3) and len(s.train) + len(s.val) == 25


def test_idx_truncated_corrupt_and_label_errors(tmp_path):
    write_idx_set(tmp_path / "ok", gz=False)
    good = (tmp_path / "ok" / "train-images-idx3-ubyte").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trunc").write_bytes(good[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad / "trunc")
    (bad / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(bad / "magic")
    (bad / "hdr").write_bytes(good[:6])
    with pytest.raises(DataError, match="header"):
        read_idx(bad / "hdr")
    (bad / "broken.gz").write_bytes(gzip.compress(good)[:50])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(bad / "broken.gz")
    arr = read_idx(tmp_path / "ok" / "train-images-idx3-ubyte")
    assert arr.shape == (30, 28, 28) and arr.dtype == np.uint8
    # a label file with a class id of 12
    labels = np.arange(12) % 10
    labels[3] = 12
    (tmp_path / "ok" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match=r"\[0, 9\]"):
        load_dataset("fashion-mnist", str(tmp_path / "ok"))
    # image/label count mismatch
    (tmp_path / "ok" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(5) % 10))
    with pytest.raises(DataError, match="12 images"):
        load_dataset("fashion-mnist", str(tmp_path / "ok"))


def test_missing_files_say_where_we_looked(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", str(tmp_path / "nothing"))
    msg = str(e.value)
    assert str(tmp_path / "nothing") in msg and "MNIST/raw" in msg and "download=True" in msg
    for name in ("cifar10", "cifar100", "svhn", "tiny-imagenet", "caltech101", "caltech256"):
        with pytest.raises(DataError, match="Looked in") as e:
            load_dataset(name, str(tmp_path))
        assert str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="train/ and test/"):
        load_dataset("image-folder", str(tmp_path))


def test_data_env_variable_is_searched(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist", n_train=20)
    monkeypatch.setenv("FORTIFY_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("mnist", val_size=4).test) == 12


def test_unknown_dataset_and_options():
    with pytest.raises(FortifyError, match="Known datasets: .*fashion-mnist"):
        load_dataset("fashion_mnist")
    with pytest.raises(DataError, match="accepted options: none"):
        load_dataset("digits", image_size=32)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("caltech101", "/nonexistent", image_size=0)
    assert reader_options("caltech101") == {"image_size": 64, "cache_dir": None}
    assert {"mnist", "fashion-mnist", "cifar10", "svhn", "image-folder"} <= set(available())


# ----------------------------------------------------------------------------- splits
def test_validation_split_rules(tmp_path):
    write_idx_set(tmp_path, n_train=50)
    a = load_dataset("mnist", str(tmp_path), val_size=8, split_seed=1)
    b = load_dataset("mnist", str(tmp_path), val_size=8, split_seed=1)
    c = load_dataset("mnist", str(tmp_path), val_size=8, split_seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    va, tr = set(a.val.images[:, 0, 0, 0].tolist()), set(a.train.images[:, 0, 0, 0].tolist())
    assert not va & tr and len(va | tr) == 50
    # val_size is capped at a fifth of the training set; negative is an error
    assert len(load_dataset("mnist", str(tmp_path), val_size=1000).val) == 10
    with pytest.raises(DataError, match="val_size"):
        load_dataset("mnist", str(tmp_path), val_size=-1)
    full = ImageSet(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    with pytest.raises(DataError, match=r"val_size must be in \[0, 9\]"):
        split_validation(full, 10, 0)
    sub = load_dataset("mnist", str(tmp_path), val_size=8, train_subset=5, test_subset=3)
    assert len(sub.train) == 5 and len(sub.test) == 3
    with pytest.raises(DataError, match="train_subset"):
        load_dataset("mnist", str(tmp_path), train_subset=0)


# ----------------------------------------------------------------------------- CIFAR
def write_cifar10(folder: Path, per_batch=4, n_test=6, protocol=2) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = i  # batch id in the red channel of pixel (0, 0)
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in RNG.integers(0, 10, n)],
            b"data": data,
            b"filenames": [f"img{j}.png".encode() for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickles(tmp_path, protocol):
    write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    s = load_dataset("cifar10", str(tmp_path), val_size=4)
    assert s.image_shape == (3, 32, 32) and s.num_classes == 10
    assert s.default_augment == "crop-flip" and s.default_eps == pytest.approx(8 / 255)
    assert len(s.train) + len(s.val) == 20 and len(s.test) == 6
    assert (s.test.images[:, 0, 0, 0] == 5).all()
    assert set(s.val.images[:, 0, 0, 0].tolist()) <= {0, 1, 2, 3, 4}
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    want = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32))
    assert torch.equal(s.test.images, want)  # row layout: 1024 R, then G, then B
    assert s.test.labels.tolist() == raw[b"labels"]
    assert s.classes[9] == "truck"


def test_cifar100_fine_labels_and_bad_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 15), ("test", 5)):
        d = {
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(range(85, 85 + n)) if name == "train" else [99, 0, 1, 2, 3],
            b"coarse_labels": [0] * n,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    s = load_dataset("cifar100", str(tmp_path), val_size=3)
    assert s.num_classes == 100 and s.test.labels.tolist() == [99, 0, 1, 2, 3]
    assert sorted(s.train.labels.tolist() + s.val.labels.tolist()) == list(range(85, 100))
    # a label of 100 is out of range
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}, f)
    with pytest.raises(DataError, match=r"\[0, 99\]"):
        load_dataset("cifar100", str(tmp_path))


class _Evil:
    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __reduce__(self):
        return (os.remove, (self.victim,))


def test_cifar_restricted_unpickler_refuses_code(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(str(victim)), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to unpickle global .*remove"):
        load_dataset("cifar10", str(tmp_path))
    assert victim.exists()
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- SVHN
def test_svhn_mat_label_10_is_zero_and_layout(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    truth = {}
    for split, n in (("train", 25), ("test", 7)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        truth[split] = (x, y)
    s = load_dataset("svhn", str(tmp_path), val_size=5)
    assert s.image_shape == (3, 32, 32) and s.default_augment == "none"
    x, y = truth["test"]
    assert s.test.labels.tolist() == [1, 2, 3, 4, 5, 6, 7]
    i = 3
    assert torch.equal(s.test.images[i], torch.from_numpy(x[:, :, :, i].transpose(2, 0, 1)))
    all_train = torch.cat([s.train.labels, s.val.labels])
    assert all_train.max() == 9 and (all_train == 0).sum() == 2  # two 10s became 0
    scipy.io.savemat(folder / "test_32x32.mat", {"X": x, "y": y * 0 + 11})
    with pytest.raises(DataError, match=r"\[1, 10\]"):
        load_dataset("svhn", str(tmp_path))
    (folder / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", str(tmp_path))


# ----------------------------------------------------------------------------- image trees
def solid(path: Path, value: int, size=(8, 8), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 128)
    Image.new(mode, size, color).save(path)


def make_tiny_imagenet(root: Path) -> list[str]:
    """``root/tiny-imagenet-200``: 3 classes × 4 train JPEGs, 7 interleaved val images and an
    unlabelled test image; pixel values follow the label. Returns the wnids in label order."""
    base = root / "tiny-imagenet-200"
    wnids = ["n002", "n001", "n003"]  # wnids.txt order defines the labels
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, w in enumerate(wnids):
        for k in range(4):
            solid(base / "train" / w / "images" / f"{w}_{k}.JPEG", 40 * label + 10)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    # val annotations deliberately interleave the classes
    order = [2, 0, 1, 0, 2, 1, 0]
    lines = []
    for i, label in enumerate(order):
        solid(base / "val" / "images" / f"val_{i}.JPEG", 40 * label + 10)
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t7\t7")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    solid(base / "test" / "images" / "test_0.JPEG", 0)  # unlabelled official test: ignored
    return wnids


def test_tiny_imagenet_tree_and_val_regrouping(tmp_path):
    wnids = make_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    s = load_dataset("tiny-imagenet", str(tmp_path), val_size=2)
    assert s.classes == wnids and s.num_classes == 3 and s.default_augment == "crop-flip"
    assert s.image_shape == (3, 8, 8)
    assert s.test.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]  # regrouped by class
    red = s.test.images[:, 0].float().mean((1, 2))
    assert torch.allclose(red, 40 * s.test.labels.float() + 10, atol=3)  # pixels follow labels
    assert len(s.train) + len(s.val) == 12
    s16 = load_dataset("tiny-imagenet", str(tmp_path), val_size=2, image_size=16)
    assert s16.image_shape == (3, 16, 16)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n999"):
        load_dataset("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_sorted_class_order(tmp_path):
    """class_order="sorted" labels classes as torchvision ImageFolder does (sorted wnids)."""
    wnids = make_tiny_imagenet(tmp_path)
    s = load_dataset("tiny-imagenet", str(tmp_path), val_size=0, class_order="sorted")
    assert s.classes == sorted(wnids) == ["n001", "n002", "n003"]
    red = s.test.images[:, 0].float().mean((1, 2))
    # pixel value 40·(wnids.txt index) + 10: n001 (index 1) is now label 0, n002 label 1
    expected = torch.tensor([40 * wnids.index(s.classes[k]) + 10 for k in s.test.labels.tolist()])
    assert torch.allclose(red, expected.float(), atol=3)
    default = load_dataset("tiny-imagenet", str(tmp_path), val_size=0)
    assert default.classes == wnids and not torch.equal(default.test.labels, s.test.labels)
    with pytest.raises(DataError, match="class_order 'random'"):
        load_dataset("tiny-imagenet", str(tmp_path), class_order="random")


def make_caltech(base: Path, counts: dict[str, int], skip: str) -> None:
    k = 0
    for cls, n in counts.items():
        for i in range(n):
            size = (12 + i, 9) if i % 2 else (9, 14)  # non-square, varied sizes
            mode = "L" if i == 1 else "RGB"  # a greyscale image among colour ones
            solid(base / cls / f"image_{i:04d}.jpg", k % 250, size=size, mode=mode)
            k += 1
    solid(base / skip / "image_0001.jpg", 7)


def test_caltech101_split_skip_and_resize(tmp_path):
    counts = {"accordion": 20, "airplanes": 3, "anchor": 2}
    make_caltech(tmp_path / "101_ObjectCategories", counts, "BACKGROUND_Google")
    s = load_dataset("caltech101", str(tmp_path), val_size=0, image_size=10)
    assert s.classes == ["accordion", "airplanes", "anchor"] and s.num_classes == 3
    assert s.image_shape == (3, 10, 10)
    assert torch.bincount(s.test.labels, minlength=3).tolist() == [2, 1, 1]  # 10 %, >= 1
    assert torch.bincount(s.train.labels, minlength=3).tolist() == [18, 2, 1]
    again = load_dataset("caltech101", str(tmp_path), val_size=0, image_size=10)
    assert torch.equal(again.test.images, s.test.images)  # deterministic split
    assert load_dataset("caltech101", str(tmp_path)).image_shape == (3, 64, 64)  # default size


def test_caltech256_split_and_names(tmp_path):
    counts = {"001.ak47": 40, "002.american-flag": 20}
    make_caltech(tmp_path / "caltech256" / "256_ObjectCategories", counts, "257.clutter")
    s = load_dataset("caltech256", str(tmp_path), val_size=0, image_size=8)
    assert s.classes == ["ak47", "american-flag"]
    assert torch.bincount(s.test.labels).tolist() == [2, 1]  # 5 %


def test_per_class_split_is_deterministic_disjoint_and_covering():
    files = [[Path(f"c{c}/img{i:03d}.jpg") for i in range(n)] for c, n in enumerate([50, 7, 1])]
    tr, te = per_class_split(files, 0.1, seed=3)
    tr2, te2 = per_class_split([list(reversed(f)) for f in files], 0.1, seed=3)
    assert (tr, te) == (tr2, te2)  # independent of listing order (sorted by name first)
    assert not set(tr) & set(te)
    assert sorted(tr + te) == sorted((p, c) for c, f in enumerate(files) for p in f)
    assert [sum(1 for _, c in te if c == k) for k in range(3)] == [5, 1, 0]
    _, te_other = per_class_split(files, 0.1, seed=4)
    assert te_other != te


def make_image_folder(root: Path, mode: str = "L") -> None:
    """``root/{train,test}/{cat,dog}/<i>.png``: 3 + 2 lossless 6×6 images per class whose
    value is 30 + i (cat) or 200 + i (dog)."""
    for split, n in (("train", 3), ("test", 2)):
        for cls, v in (("cat", 30), ("dog", 200)):
            for i in range(n):
                solid(root / split / cls / f"{i}.png", v + i, size=(6, 6), mode=mode)


def test_image_folder_grey_rgb_and_errors(tmp_path):
    make_image_folder(tmp_path)
    s = load_dataset("image-folder", str(tmp_path), val_size=1, image_size=None)
    assert s.classes == ["cat", "dog"] and s.image_shape == (1, 6, 6)
    assert s.test.labels.tolist() == [0, 0, 1, 1]
    assert s.test.images[:, 0, 0, 0].tolist() == [30, 31, 200, 201]  # PNG is lossless
    assert load_dataset("image-folder", str(tmp_path), image_size=4).image_shape == (1, 4, 4)
    rgb = load_dataset("image-folder", str(tmp_path), image_size=4, grayscale=False)
    assert rgb.image_shape == (3, 4, 4)
    solid(tmp_path / "train" / "cat" / "big.png", 5, size=(9, 6), mode="RGB")
    assert load_dataset("image-folder", str(tmp_path)).image_shape == (3, 64, 64)
    with pytest.raises(DataError, match="different sizes"):
        load_dataset("image-folder", str(tmp_path), image_size=None)
    solid(tmp_path / "test" / "cow" / "0.png", 5, size=(6, 6), mode="L")
    with pytest.raises(DataError, match="cow"):
        load_dataset("image-folder", str(tmp_path))
    (tmp_path / "test" / "cow" / "0.png").write_bytes(b"garbage")
    (tmp_path / "train" / "cow").mkdir()
    (tmp_path / "train" / "cow" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.png"):
        load_dataset("image-folder", str(tmp_path))


# ----------------------------------------------------------------------------- real data
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="no system Fashion-MNIST"
)
def test_real_fashion_mnist_from_debian_package(tmp_path):
    s = load_dataset("fashion-mnist", str(REAL_FASHION), val_size=5000)
    assert len(s.train) == 55000 and len(s.val) == 5000 and len(s.test) == 10000
    assert s.image_shape == (1, 28, 28)
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert torch.bincount(torch.cat([s.train.labels, s.val.labels])).tolist() == [6000] * 10
    # with an empty root the Debian copy is still found as a fallback location
    assert len(load_dataset("fashion-mnist", str(tmp_path), val_size=10).test) == 10000
