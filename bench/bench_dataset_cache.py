"""How much does the decoded-dataset cache save?

Writes a Caltech-256-style folder (``256_ObjectCategories/<NNN.name>/*.jpg``) of ``--images``
random-texture JPEGs of ``--size``² pixels into a temporary directory, then times
``load_dataset("caltech256", ..., image_size=64)``:

* ``no cache``: ``cache_dir="off"``, every file decoded (what every run cost before the cache);
* ``first load``: decoding plus writing the cache (a fresh cache directory each repeat);
* ``cached load``: reading the cache back (hash check included).

Prints the median of ``--repeats`` runs of each. The files are in the page cache (written just
before), so "no cache" is the decode cost alone, not disk reads.

Run:  nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dataset_cache.py \
          [--images 2000] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fortify.data import load_dataset

CLASSES = 20


def write_folder(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """``n_images`` JPEGs (quality 90) spread over ``CLASSES`` class folders under ``root``."""
    rng = np.random.default_rng(seed)
    base = root / "256_ObjectCategories"
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_images):
        folder = base / f"{i % CLASSES + 1:03d}.class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth gradients plus noise: compresses like a photograph, not like a flat colour
        freq = rng.uniform(0.02, 0.2, size=3)
        phase = rng.uniform(0, 6.3, size=3)
        planes = [np.sin(freq[c] * (xx + 0.7 * yy) + phase[c]) for c in range(3)]
        img = 127 + 90 * np.stack(planes, -1) + rng.normal(0, 20, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            folder / f"{i // CLASSES + 1:04d}.jpg", quality=90
        )
    return root


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="side of the generated JPEGs (px)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_folder(Path(tmp) / "data", args.images, args.size)
        caches = iter(range(10**6))

        def load(cache_dir: str) -> None:
            load_dataset("caltech256", str(data), val_size=0, image_size=64, cache_dir=cache_dir)

        def first() -> None:
            load(str(Path(tmp) / f"cache{next(caches)}"))

        no_cache = timed(lambda: load("off"), args.repeats)
        cold = timed(first, args.repeats)
        warm_dir = str(Path(tmp) / "cache0")
        warm = timed(lambda: load(warm_dir), args.repeats)
        size_mb = sum(p.stat().st_size for p in Path(warm_dir).glob("*.safetensors")) / 2**20
    print(f"{args.images} JPEGs of {args.size}² px -> uint8 3×64×64; cache {size_mb:.1f} MiB")
    print(f"{'no cache (decode only)':<26}{no_cache:8.3f} s")
    print(f"{'first load (decode+write)':<26}{cold:8.3f} s")
    print(f"{'cached load':<26}{warm:8.3f} s   ({no_cache / warm:.0f}x faster than decoding)")


if __name__ == "__main__":
    main()
