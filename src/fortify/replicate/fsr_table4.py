"""``fortify replicate fsr-table4``: FSR's Table 4 (AT vs AT + FSR, FD, CAS, CIFS) at CPU scale.

Five rows on Fashion-MNIST with the ``fsr-table1`` AT recipe, each trained with ≥ 3 seeds
(default 0,1,2) and evaluated on the same points with the FSR paper suite and AutoAttack. Every
row is compared with plain AT by a seed-then-point bootstrap CI and a CI-derived verdict. The
page goes to ``--doc``; per-row, per-seed JSON (with per-point outcomes) next to it. Placements
follow ``configs/fsr/cifar10/resnet18-at-*.yaml``: FSR after ``layer4``; FD after every stage
(embedded Gaussian non-local); CAS and CIFS after ``layer4.0`` and ``layer4.1``.
"""

from __future__ import annotations

from fortify.replicate._feature_table import FeatureTable
from fortify.replicate._feature_table_rows import Row

NAME = "fsr-table4"
HELP = "FSR Table 4 at CPU scale: AT, AT+FSR, AT+FD, AT+CAS, AT+CIFS on Fashion-MNIST, 3 seeds"
DESCRIPTION = __doc__

ROWS = {
    "at": Row("AT", [], "44.11"),
    # FSR at its default place (after the last stage, layer4): the config fsr-table1's AT + FSR
    # row trains, so a finished fsr-table1 run of the same seed can be reused here
    "at-fsr": Row("AT + FSR", [{"kind": "fsr"}], "46.41"),
    "at-fd": Row("AT + FD", [{"kind": "fd", "at": []}], "44.57"),
    "at-cas": Row("AT + CAS", [{"kind": "cas", "at": ["layer4.0", "layer4.1"]}], "44.23"),
    "at-cifs": Row("AT + CIFS", [{"kind": "cifs", "at": ["layer4.0", "layer4.1"]}], "43.94"),
}
BASELINE = "at"


TITLE = "FSR Table 4 at CPU scale: feature-level defences under AT (Fashion-MNIST)"
DOC = "docs/results/fsr_table4.md"
NOTES = """\
- rows: AT; AT + FSR after layer4 (τ 0.1, λ_sep = λ_rec = 1); AT + FD after every stage
  (embedded Gaussian non-local means, 1×1 conv + zero-γ BN, residual); AT + CAS after layer4.0
  and layer4.1 (β 2); AT + CIFS after layer4.0 (non-linear probe) and layer4.1 (linear probe), β
  2, k 2, detached relevance — each block's paper defaults
- attacks see the deterministic eval-mode models: CAS/CIFS masks from their own predictions; the
  attacks target the final logits only (FSR protocol)
"""
TABLE = FeatureTable(NAME, TITLE, ROWS, BASELINE, DOC, NOTES)
add_arguments, run = TABLE.add_arguments, TABLE.run
