"""scikit-learn's bundled 8×8 handwritten digits: always available, no download."""

from __future__ import annotations

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError


@register_reader("digits")
def read_digits(root: str | None = None, download: bool = False) -> ReaderResult:
    """1,797 grey 8×8 images (values 0–16 scaled to 0–255); a fixed 80/20 train/test split.

    The images are read from the installed scikit-learn package, never from a folder: an
    explicit ``root`` (``data.root`` / ``--data-root``) raises :class:`DataError` rather than
    being ignored. ``$FORTIFY_DATA`` (a search path for every dataset) does not apply.
    """
    if root is not None:
        raise DataError(
            f"digits: the 8×8 digits ship with scikit-learn and are read from the installed "
            f"package, so they take no data root; got {root!r} (from root= / data.root / "
            "--data-root). Leave it unset (root=None, data.root: null, no --data-root)"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    perm = np.random.default_rng(12345).permutation(len(images))
    n_test = len(images) // 5
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    train = ImageSet(x[train_idx], y[train_idx])
    test = ImageSet(x[test_idx], y[test_idx])
    return train, test, 10, [str(i) for i in range(10)], 0.1, "none"
