"""``fortify replicate bf16-parity``: does bf16 + channels-last training cost robustness?

bf16 autocast with channels-last tensors makes an AT step about 2× faster on CPUs with AVX-512
BF16 (``bench/bench_train.py``). This command measures what it costs: plain AT with the
``fsr-table1`` recipe trained once in bf16 + channels-last (row ``at-bf16``) and once in fp32
with the default memory format (row ``at-fp32``), for every seed of ``--seeds``; both are
evaluated in fp32 on the same test points with the FSR paper suite and AutoAttack on the first
``--aa-points``. The page reports fp32 − bf16 per column with a seed-then-point bootstrap CI and
the verdict the CI implies. Measured (docs/results/bf16_parity.md): bf16 cost robustness, so the
CPU presets and the replicate recipes train in fp32 by default (``--precision bf16`` opts in).
"""

from __future__ import annotations

from fortify.replicate._feature_table import FeatureTable
from fortify.replicate._feature_table_rows import Row

NAME = "bf16-parity"
HELP = "AT trained in bf16 + channels-last vs fp32 (Fashion-MNIST, fp32 evaluation, 3 seeds)"
DESCRIPTION = __doc__

ROWS = {
    "at-bf16": Row(
        "AT, bf16 + channels-last training",
        train={"precision": "bf16", "channels_last": True},
    ),
    "at-fp32": Row("AT, fp32 training", train={"precision": "fp32", "channels_last": False}),
}
BASELINE = "at-bf16"


TITLE = "bf16 + channels-last vs fp32 training at CPU scale (Fashion-MNIST, AT)"
DOC = "docs/results/bf16_parity.md"
NOTES = """\
- both rows: the fsr-table1 AT recipe (small-resnet, PGD inner attack, SGD multistep); only
  `train.precision` and `train.channels_last` differ; every evaluation runs in fp32
- the difference is fp32 − bf16: a CI that covers 0 means no detectable cost of bf16 training at
  this scale
"""
TABLE = FeatureTable(NAME, TITLE, ROWS, BASELINE, DOC, NOTES)
add_arguments, run = TABLE.add_arguments, TABLE.run
