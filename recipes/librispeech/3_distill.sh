#!/usr/bin/env bash
# Stage 3: one student per criterion in CRITERIA, trained with `--task asr_distillation`: the teachers
# run online on each batch and the criterion distils their token distributions. The students train
# on the references of TRAIN_SUBSETS, as the authors' ASR students do: unlike the MT recipe there is
# no sequence-level distillation data (no decoding of the training set). The authors' settings
# (config.sh): adam for PD-EnD2 and the other Dirichlet criteria, adadelta for the KD baseline
# (ADADELTA_CRITERIA). Criteria listed in FINETUNE_FROM_KD start from the KD student
# (forward_kl_mean_distillation, which must come earlier in CRITERIA); those listed in ANNEAL_CRITERIA
# train with the temperature annealed (INIT_TEMP, ANNEAL_START, ANNEAL_END; the authors' commands
# pass --anneal-start 0 --anneal-end 4000; ../lib.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

ENSEMBLE=$(ensemble)
# shellcheck disable=SC2206
student_extra=($STUDENT_EXTRA)

check_criteria
stage "3/4 students: $(update_size "" frames)"
for criterion in $CRITERIA; do
  stage "3/4 student --criterion $criterion -> $STUDENTS_DIR/$criterion"
  criterion_options "$criterion"
  init_options "$criterion"
  mapfile -t optim < <(student_optim_args "$criterion")
  train_model "$STUDENTS_DIR/$criterion" "$DATA" --task asr_distillation --ensemble-paths "$ENSEMBLE" \
    "${data_args[@]}" "${model_args[@]}" "${optim[@]}" "${crit[@]}" "${init[@]}" \
    --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-epoch "$MAX_EPOCH" \
    --keep-last-epochs "$KEEP_LAST_EPOCHS" --seed "$SEED" \
    "${student_device_args[@]}" "${extra[@]}" "${student_extra[@]}"
done
