#!/usr/bin/env bash
# The WMT17 En-De recipe, all stages in order (STAGES="1 2 3 4 5" by default). Every stage skips what
# it has finished, so re-running resumes. Settings: config.sh; DRY_RUN=1 prints every command.
#   WORK=/scratch/wmt17 NGPU=8 bash recipes/wmt17_en_de/run.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
: "${STAGES:=1 2 3 4 5}"
run_stages 1_prepare.sh 2_train_teachers.sh 3_distill_data.sh 4_distill.sh 5_evaluate.sh
