#!/usr/bin/env bash
# Regenerate the plots shown in docs/evaluation.md (docs/figures/*.png) on small CPU runs:
# the demo (1 epoch on 4,096 images), `eval --plot`, RiFT's MRC and interpolation on the demo's
# AT run, and the FSR mask figure of its AT+FSR run. The numbers in them are those of tiny runs;
# the figures show what each plot looks like and how to read it.
#   bash scripts/doc_figures.sh [WORK_DIR]        (FORTIFY="python -m fortify.cli.main" works too)
set -euo pipefail
cd "$(dirname "$0")/.."
FORTIFY=${FORTIFY:-fortify}
WORK=${1:-$(mktemp -d)}
OUT=docs/figures
mkdir -p "$OUT"
if [ ! -f "$WORK/demo/demo.json" ]; then  # a finished demo in WORK_DIR is reused
  $FORTIFY demo --run-dir "$WORK/demo" --set train.epochs=1 --set data.train_subset=4096 \
      --set train.val_points=200 --set eval.n_points=100
fi
$FORTIFY eval "$WORK/demo/at-fsr" --suite quick --n-points 100 --plot --out "$WORK/eval" \
    --allow-unreliable
$FORTIFY rift run "$WORK/demo/at" --passes 2 --points 256 --epochs 1 --val-points 200 \
    --test-points 100 --suites pgd10 --alpha-step 0.25 --force
$FORTIFY analyze "$WORK/demo/at-fsr" --what masks --images 4
cp "$WORK/demo/accuracy_per_attack.png" "$WORK/demo/robust_vs_eps.png" "$OUT/"
cp "$WORK/eval/eps_curve.png" "$OUT/eps_curve.png"
cp "$WORK/demo/at/rift/mrc/mrc.png" "$OUT/mrc.png"
cp "$WORK/demo/at/rift/interpolate/tradeoff.png" "$OUT/tradeoff.png"
cp "$WORK/demo/at-fsr/reports/fsr_masks.png" "$OUT/fsr_masks.png"
ls -l "$OUT"
