"""``fortify replicate fsr-ablations``: FSR's Tables 6, A6 and A4 at CPU scale.

AT + FSR (full, after ``layer4``) against its ablations — without separation, without
recalibration (Table 6), binary mask (Table A6) — and its position after stage 1, 2, 3 or 3+4
(Table A4; stage 4 is the full row) on Fashion-MNIST with the ``fsr-table1`` AT recipe, each
trained with every seed in ``--seeds`` and evaluated on the same points with the FSR paper suite
and AutoAttack. Each row is compared with the full FSR row by a seed-then-point bootstrap CI and
a CI-derived verdict. Shares run directories with ``fsr-table4`` (default ``--out``).
"""

from __future__ import annotations

from fortify.replicate._feature_table import FeatureTable
from fortify.replicate._feature_table_rows import Row

NAME = "fsr-ablations"
HELP = "FSR Tables 6/A6/A4 at CPU scale: FSR ablations and block positions on Fashion-MNIST"
DESCRIPTION = __doc__


def _fsr(at: list[str], **options: object) -> list[dict[str, object]]:
    return [{"kind": "fsr", "at": at, "options": dict(options)}]


ROWS = {
    # the default place is layer4; fsr-table4's row of the same name (the same run directory)
    "at-fsr": Row("AT + FSR (full, layer4)", _fsr([]), "46.41 (Table 4)"),
    "fsr-no-separation": Row(
        "w/o separation", _fsr(["layer4"], ablation="no-separation"), "45.47 (Table 6)"
    ),
    "fsr-no-recalibration": Row(
        "w/o recalibration", _fsr(["layer4"], ablation="no-recalibration"), "44.96 (Table 6)"
    ),
    "fsr-binary": Row("binary mask", _fsr(["layer4"], mask="binary"), "44.26 (Table A6)"),
    "fsr-block1": Row("position: after stage 1", _fsr(["layer1"]), "Table A4 (block 1)"),
    "fsr-block2": Row("position: after stage 2", _fsr(["layer2"]), "Table A4 (block 2)"),
    "fsr-block3": Row("position: after stage 3", _fsr(["layer3"]), "Table A4 (block 3)"),
    "fsr-block3-4": Row(
        "position: after stages 3 and 4", _fsr(["layer3", "layer4"]), "Table A4 (blocks 3+4)"
    ),
}
BASELINE = "at-fsr"


TITLE = "FSR ablations and block positions at CPU scale (Fashion-MNIST)"
DOC = "docs/results/fsr_ablations.md"
NOTES = """\
- ablations as defined in docs/fsr.md: without separation = no mask, output f + R(f), only the
  recalibration loss; without recalibration = output f+, only the separation loss; binary mask =
  hard 0/1 mask with a straight-through gradient
- the paper's Table A4 reports block 4 as best; its numbers for the other positions are not in
  our spec
"""
TABLE = FeatureTable(NAME, TITLE, ROWS, BASELINE, DOC, NOTES)
add_arguments, run = TABLE.add_arguments, TABLE.run
