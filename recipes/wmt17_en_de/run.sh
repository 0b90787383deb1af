#!/usr/bin/env bash
# The WMT17 En-De recipe, all stages in order (STAGES="1 2 3 4 5" by default). Every stage skips what
# it has finished, so re-running resumes. Settings: config.sh; DRY_RUN=1 prints every command.
#   WORK=/scratch/wmt17 NGPU=8 bash recipes/wmt17_en_de/run.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${STAGES:=1 2 3 4 5}"
# the plugin folder for --user-dir, looked up once (each stage would start a Python for it)
USER_DIR=${USER_DIR:-$(fairseq-pdd-user-dir)}
export USER_DIR
declare -A SCRIPT=([1]=1_prepare.sh [2]=2_train_teachers.sh [3]=3_distill_data.sh [4]=4_distill.sh [5]=5_evaluate.sh)
for s in $STAGES; do
  if [ -z "${SCRIPT[$s]:-}" ]; then
    echo "error: unknown stage '$s' in STAGES (1 to 5)" >&2
    exit 1
  fi
done
for s in $STAGES; do bash "$HERE/${SCRIPT[$s]}"; done
