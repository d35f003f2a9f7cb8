"""The decoded-dataset cache (fortify.data.cache) on tiny image trees in the real layouts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import PIL.Image
import pytest
import torch
from test_data_readers import make_caltech, make_image_folder, make_tiny_imagenet, solid

from fortify.data import load_dataset
from fortify.data.base import DataSplits
from fortify.data.cache import resolve_cache_dir
from fortify.data.readers import caltech
from fortify.errors import DataError

LOGGER = "fortify.data.cache"


def build(kind: str, root: Path) -> tuple[str, dict]:
    """Write dataset ``kind`` under ``root``; return its registry name and reader options."""
    if kind == "caltech101":
        counts = {"accordion": 12, "airplanes": 3, "anchor": 2}
        make_caltech(root / "101_ObjectCategories", counts, "BACKGROUND_Google")
        return "caltech101", {"image_size": 10}
    if kind == "caltech256":
        counts = {"001.ak47": 21, "002.american-flag": 4}
        make_caltech(root / "256_ObjectCategories", counts, "257.clutter")
        return "caltech256", {"image_size": 8}
    if kind == "tiny-imagenet":
        make_tiny_imagenet(root)
        return "tiny-imagenet", {}
    make_image_folder(root)  # greyscale: the colour mode is detected from the files
    return "image-folder", {"image_size": None}


def load(name: str, root: Path, **options) -> DataSplits:
    return load_dataset(name, str(root), val_size=2, **options)


def assert_same(a: DataSplits, b: DataSplits) -> None:
    for split in ("train", "val", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert x.images.dtype == y.images.dtype == torch.uint8
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert a.classes == b.classes and a.image_shape == b.image_shape


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch) -> None:
    """Run in ``tmp_path``: a cache_dir value taken as a relative path lands there, never in
    the working tree (test_disabled_cache_writes_nothing checks that it does not happen)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FORTIFY_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def opens(monkeypatch) -> list[str]:
    """Names of the files PIL opens from now on."""
    seen: list[str] = []
    real = PIL.Image.open

    def spy(fp, *args, **kwargs):
        seen.append(Path(fp).name)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", spy)
    return seen


def forbid_decoding(monkeypatch) -> None:
    def refuse(fp, *args, **kwargs):
        raise AssertionError(f"PIL.Image.open({fp}) called although the cache should be used")

    monkeypatch.setattr(PIL.Image, "open", refuse)


@pytest.mark.parametrize("kind", ["caltech101", "caltech256", "tiny-imagenet", "image-folder"])
def test_second_load_reads_cache_with_identical_arrays(kind, tmp_path, cache, monkeypatch, caplog):
    name, options = build(kind, tmp_path / "data")
    before = snapshot(tmp_path / "data")
    plain = load(name, tmp_path / "data", cache_dir="off", **options)
    assert not cache.exists()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = load(name, tmp_path / "data", **options)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json"] + [".safetensors"] * 2
    assert caplog.text.count("cached ") == 2
    caplog.clear()
    forbid_decoding(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        second = load(name, tmp_path / "data", **options)
    n_train = len(second.train) + len(second.val)
    assert f"{name} train: loaded {n_train} images from cache {cache}" in caplog.text
    assert f"{name} test: loaded {len(second.test)} images from cache" in caplog.text
    assert_same(plain, first)
    assert_same(plain, second)
    assert snapshot(tmp_path / "data") == before  # the data folder is never written to


def test_sidecar_records_key_hash_and_shape(tmp_path, cache):
    name, options = build("caltech101", tmp_path)
    s = load(name, tmp_path, **options)
    sides = sorted(cache.glob("caltech101-test-*.json"))
    assert len(sides) == 1
    record = json.loads(sides[0].read_text())
    assert record["num_images"] == len(s.test) and record["image_shape"] == [3, 10, 10]
    assert record["size_bytes"] == sides[0].with_suffix(".safetensors").stat().st_size
    assert len(record["key"]) == len(record["sha256"]) == 64
    parts = record["key_parts"]
    assert parts["settings"]["image_size"] == 10 and parts["versions"]["reader"] == 1
    assert parts["num_files"] == 17 and parts["split"] == "test"


def test_touching_rewriting_or_adding_a_file_invalidates(tmp_path, cache, opens, caplog):
    data = tmp_path / "data"
    make_image_folder(data)
    first = load("image-folder", data, image_size=None)
    assert first.test.images[:, 0, 0, 0].tolist() == [30, 31, 200, 201]
    opens.clear()
    load("image-folder", data, image_size=None)
    assert opens == []  # cached
    # touching one file (new mtime, same content) invalidates both splits
    img = data / "test" / "cat" / "0.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = load("image-folder", data, image_size=None)
    assert caplog.text.count("stale") == 2
    assert "0.png" in opens
    assert_same(first, again)
    # rewriting a file's content: the new pixels are seen, not the cached ones
    solid(img, 99, size=(6, 6), mode="L")
    if img.stat().st_mtime_ns == st.st_mtime_ns + 10**9:  # coarse clock: make the change visible
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert load("image-folder", data, image_size=None).test.images[0, 0, 0, 0] == 99
    # adding a file
    solid(data / "test" / "dog" / "9.png", 7, size=(6, 6), mode="L")
    grown = load("image-folder", data, image_size=None)
    assert grown.test.images[:, 0, 0, 0].tolist() == [99, 31, 200, 201, 7]
    opens.clear()
    assert_same(grown, load("image-folder", data, image_size=None))
    assert opens == []  # the rebuilt cache is used


def test_settings_and_reader_version_are_part_of_the_key(tmp_path, cache, monkeypatch, caplog):
    name, _ = build("caltech101", tmp_path)
    small = load(name, tmp_path, image_size=6)
    big = load(name, tmp_path, image_size=12)
    assert small.image_shape == (3, 6, 6) and big.image_shape == (3, 12, 12)
    assert len(list(cache.glob("*.safetensors"))) == 4  # one pair per split and size
    monkeypatch.setattr(caltech, "READER_VERSION", caltech.READER_VERSION + 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert_same(small, load(name, tmp_path, image_size=6))
    assert caplog.text.count("stale") == 2
    assert len(list(cache.glob("*.safetensors"))) == 4  # replaced, not added


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "bad-sidecar", "no-sidecar"])
def test_corrupt_cache_is_detected_and_rebuilt(damage, tmp_path, cache, opens, monkeypatch, caplog):
    name, options = build("caltech101", tmp_path)
    first = load(name, tmp_path, **options)
    (data,) = cache.glob("caltech101-train-*.safetensors")
    side = data.with_suffix(".json")
    if damage == "flip-byte":
        blob = bytearray(data.read_bytes())
        blob[-5] ^= 0xFF  # a data byte: safetensors alone would not notice
        data.write_bytes(bytes(blob))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-50])
    elif damage == "bad-sidecar":
        side.write_text("{not json")
    else:
        side.unlink()
    opens.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = load(name, tmp_path, **options)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(data) in warnings[0].getMessage()
    want = "SHA-256" if damage in ("flip-byte", "truncate") else "sidecar"
    assert want in warnings[0].getMessage()
    assert len(opens) == len(first.train) + len(first.val)  # only the damaged split decoded
    assert_same(first, again)
    forbid_decoding(monkeypatch)
    assert_same(first, load(name, tmp_path, **options))  # repaired


@pytest.mark.parametrize(
    "env, option", [("off", None), ("None", None), ("FALSE", None), (None, False), (None, "off")]
)
def test_disabled_cache_writes_nothing(env, option, tmp_path, monkeypatch, opens):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fixture_dir = Path(os.environ["FORTIFY_CACHE_DIR"])
    if env is not None:
        monkeypatch.setenv("FORTIFY_CACHE_DIR", env)
    name, options = build("caltech101", tmp_path / "data")
    for _ in range(2):
        opens.clear()
        s = load(name, tmp_path / "data", cache_dir=option, **options)
        assert len(opens) == 17  # decoded every time
    assert len(s.test) == 3
    assert not (tmp_path / "home").exists() and list(fixture_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cache_dir_option_wins_and_data_folder_is_refused(tmp_path, cache, caplog):
    name, options = build("caltech101", tmp_path)
    load(name, tmp_path, cache_dir=str(tmp_path / "mine"), **options)
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 2 and not cache.exists()
    inside = tmp_path / "101_ObjectCategories" / "cache"
    before = snapshot(tmp_path / "101_ObjectCategories")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load(name, tmp_path, cache_dir=str(inside), **options)
    assert "inside the data folder" in caplog.text
    assert snapshot(tmp_path / "101_ObjectCategories") == before


def test_unwritable_cache_dir_warns_and_still_loads(tmp_path, caplog):
    name, options = build("caltech101", tmp_path / "data")
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = load(name, tmp_path / "data", cache_dir=str(tmp_path / "file" / "cache"), **options)
    assert len(s.test) == 3 and caplog.text.count("could not write dataset cache") == 2
    assert (tmp_path / "file").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "file",
    ]


def test_resolve_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FORTIFY_CACHE_DIR")
    default = tmp_path / ".cache" / "fortify" / "datasets"
    assert resolve_cache_dir() == default and resolve_cache_dir(True) == default
    monkeypatch.setenv("FORTIFY_CACHE_DIR", "")
    assert resolve_cache_dir() == default
    monkeypatch.setenv("FORTIFY_CACHE_DIR", "~/elsewhere")
    assert resolve_cache_dir() == tmp_path / "elsewhere"
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"  # the option wins
    assert resolve_cache_dir(False) is None and resolve_cache_dir(" Off ") is None
    monkeypatch.setenv("FORTIFY_CACHE_DIR", "none")
    assert resolve_cache_dir() is None
    with pytest.raises(DataError, match=r"cache_dir must be None .*'off'.*got 3 of type int"):
        resolve_cache_dir(3)  # type: ignore[arg-type]
    make_image_folder(tmp_path / "data")
    with pytest.raises(DataError, match="cache_dir must be"):
        load_dataset("image-folder", str(tmp_path / "data"), cache_dir=1.5)
