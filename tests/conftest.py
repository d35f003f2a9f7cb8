"""Test-wide settings.

Tests use tiny models, for which one intra-op thread per process is fastest; the test command
runs two pytest workers (pytest-xdist) to use both cores. Several OpenMP threads per process on
a busy machine spin against each other and can slow small attacks (e.g. FAB) by 20× or more.
``FORTIFY_TEST_THREADS`` overrides the thread count.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("FORTIFY_TEST_THREADS", "1")))
