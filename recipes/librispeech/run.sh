#!/usr/bin/env bash
# The LibriSpeech recipe, all stages in order (STAGES="1 2 3 4" by default). Every stage skips what it
# has finished, so re-running resumes. Settings: config.sh; DRY_RUN=1 prints every command.
#   WORK=/scratch/librispeech LIBRISPEECH=/data/LibriSpeech NGPU=8 bash recipes/librispeech/run.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${STAGES:=1 2 3 4}"
# the plugin folder for --user-dir, looked up once (each stage would start a Python for it)
USER_DIR=${USER_DIR:-$(fairseq-pdd-user-dir)}
export USER_DIR
declare -A SCRIPT=([1]=prepare.sh [2]=2_train_teachers.sh [3]=3_distill.sh [4]=4_evaluate.sh)
for s in $STAGES; do
  if [ -z "${SCRIPT[$s]:-}" ]; then
    echo "error: unknown stage '$s' in STAGES (1 to 4)" >&2
    exit 1
  fi
done
for s in $STAGES; do bash "$HERE/${SCRIPT[$s]}"; done
