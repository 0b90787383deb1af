#!/usr/bin/env bash
# Stage 2: the teacher ensemble, M VGG-Transformers (ARCH, pdd_vggtransformer_2 = fairseq's
# vggtransformer_2; one per seed in SEEDS) trained with fairseq's speech_to_text task and
# cross-entropy (label-smoothed with LABEL_SMOOTHING > 0) on TRAIN_SUBSETS of $DATA. Each teacher is
# one `train` (recipes/lib.sh) on NGPU x NNODES workers; an interrupted teacher resumes from its
# checkpoint_last.pt, a finished one (marker file `done` in its save dir) is skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

mapfile -t optim < <(adadelta_args "$TEACHER_LR")
criterion=(--criterion cross_entropy)
if [ "$LABEL_SMOOTHING" != 0 ]; then
  criterion=(--criterion label_smoothed_cross_entropy --label-smoothing "$LABEL_SMOOTHING")
fi
# shellcheck disable=SC2206
teacher_extra=($TEACHER_EXTRA)
stage "2/4 teachers: $(update_size TEACHER_ frames)"
train_teachers 2/4 "$DATA" --task speech_to_text "${data_args[@]}" "${model_args[@]}" "${optim[@]}" \
  --clip-norm "$TEACHER_CLIP_NORM" "${criterion[@]}" --max-tokens "$TEACHER_MAX_TOKENS" \
  --update-freq "$TEACHER_UPDATE_FREQ" --max-epoch "$TEACHER_MAX_EPOCH" --keep-last-epochs "$KEEP_LAST_EPOCHS" \
  "${teacher_device_args[@]}" "${extra[@]}" "${teacher_extra[@]}"
