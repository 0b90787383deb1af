#!/usr/bin/env bash
# The LibriSpeech recipe, all stages in order (STAGES="1 2 3 4" by default). Every stage skips what it
# has finished, so re-running resumes. Settings: config.sh; DRY_RUN=1 prints every command.
#   WORK=/scratch/librispeech LIBRISPEECH=/data/LibriSpeech NGPU=8 bash recipes/librispeech/run.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
: "${STAGES:=1 2 3 4}"
run_stages prepare.sh 2_train_teachers.sh 3_distill.sh 4_evaluate.sh
