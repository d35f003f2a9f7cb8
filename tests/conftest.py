"""Test-wide settings.

Tests use tiny models, for which one intra-op thread per process is fastest; the test command
runs two pytest workers (pytest-xdist) to use both cores. Several OpenMP threads per process on
a busy machine spin against each other and can slow small attacks (e.g. FAB) by 20× or more.
``FORTIFY_TEST_THREADS`` overrides the thread count.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FORTIFY_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _dataset_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Point the decoded-dataset cache (fortify.data.cache) at a fresh temporary folder per
    test, never at the real ``~/.cache``."""
    monkeypatch.setenv("FORTIFY_CACHE_DIR", str(tmp_path_factory.mktemp("fortify-cache")))
