#!/usr/bin/env bash
# Stage 2: the teacher ensemble, M Transformer-big models (one per seed in SEEDS) trained with
# label-smoothed cross-entropy on $DATA. Each teacher is one `train` (recipes/lib.sh) on NGPU x NNODES
# workers; an interrupted teacher resumes from its checkpoint_last.pt, a finished one (marker file
# `done` in its save dir) is skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

mapfile -t optim < <(optim_args "$TEACHER_CLIP_NORM" "$TEACHER_DROPOUT")
# shellcheck disable=SC2206
teacher_extra=($TEACHER_EXTRA)
stage "2/5 teachers: $(update_size TEACHER_)"
train_teachers 2/5 "$DATA" "${model_args[@]}" "${optim[@]}" \
  --criterion label_smoothed_cross_entropy --label-smoothing "$LABEL_SMOOTHING" \
  --max-tokens "$TEACHER_MAX_TOKENS" --update-freq "$TEACHER_UPDATE_FREQ" --max-update "$TEACHER_MAX_UPDATE" \
  "${teacher_device_args[@]}" "${extra[@]}" "${teacher_extra[@]}"
