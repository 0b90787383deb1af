#!/usr/bin/env bash
# Regenerate the documentation's figures from the embedded demo: bash scripts/doc_figures.sh [WORK]
# WORK (default runs/toy) is a demo work folder; when it holds no report yet, the demo runs there first
# (a few minutes; finished stages are skipped). Copies the OOD ROC plot of the unseen-word set and the
# rejection-curve plot of mutual information, as fairseq-pdd-evaluate drew them, into docs/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/toy}
[ -f "$WORK/report/report.json" ] || WORK="$WORK" bash scripts/demo.sh
mkdir -p docs/figures
for plot in roc_unseen rejection_mutual_information; do
  cp "$WORK/report/plots/$plot.png" "docs/figures/$plot.png"
  echo "docs/figures/$plot.png"
done
