"""Test-wide settings.

Tests use tiny models, for which one intra-op thread per process is fastest; the test command
runs two pytest workers (pytest-xdist) to use both cores. Several OpenMP threads per process on
a busy machine spin against each other and can slow small attacks (e.g. FAB) by 20× or more.
``FORTIFY_TEST_THREADS`` overrides the thread count.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_config

torch.set_num_threads(int(os.environ.get("FORTIFY_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _dataset_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Point the decoded-dataset cache (fortify.data.cache) at a fresh temporary folder per
    test, never at the real ``~/.cache``."""
    monkeypatch.setenv("FORTIFY_CACHE_DIR", str(tmp_path_factory.mktemp("fortify-cache")))


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """The tiny config (two epochs) as a YAML file."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(2))
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the tiny config; tests copy it or compare its files before
    and after a bad command."""
    from fortify.config import ExperimentConfig, load_config
    from fortify.train import fit

    folder = tmp_path_factory.mktemp("finished")
    (folder / "tiny.yaml").write_text(tiny_config(1))
    run = folder / "run"
    fit(load_config(ExperimentConfig, folder / "tiny.yaml"), run, progress=False)
    return run
