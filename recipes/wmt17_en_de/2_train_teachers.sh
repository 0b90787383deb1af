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
mapfile -t saves < <(teacher_dirs)
for i in "${!saves[@]}"; do
  save=${saves[$i]} seed=${seeds[$i]}
  stage "2/5 teacher $((i + 1))/$M (seed $seed) -> $save"
  done_already "$save/done" && continue
  run mkdir -p "$save"
  train "$DATA" "${model_args[@]}" "${optim[@]}" \
    --criterion label_smoothed_cross_entropy --label-smoothing "$LABEL_SMOOTHING" \
    --max-tokens "$TEACHER_MAX_TOKENS" --update-freq "$TEACHER_UPDATE_FREQ" --max-update "$TEACHER_MAX_UPDATE" \
    --seed "$seed" --save-dir "$save" --log-file "$save/train.log" --log-format simple \
    "${teacher_device_args[@]}" "${extra[@]}" "${teacher_extra[@]}"
  run touch "$save/done"
done
