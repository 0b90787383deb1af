#!/usr/bin/env bash
# Stage 4: one student per criterion in CRITERIA, trained on $DISTILL_DATA (the ensemble's
# translations) with `--task distillation`: the teachers run online on each batch and the criterion
# distils their token distributions. The paper's hyper-parameters (config.sh). Criteria listed in
# FINETUNE_FROM_KD (EnD2's NLL, the forward KL to the proxy: from scratch they collapse to a flat
# Dirichlet) start from the KD student (forward_kl_mean_distillation, which must come earlier in
# CRITERIA); those listed in ANNEAL_CRITERIA train with the temperature annealed (INIT_TEMP,
# ANNEAL_START, ANNEAL_END; ../lib.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

ENSEMBLE=$(ensemble)
mapfile -t optim < <(optim_args "$CLIP_NORM" "$DROPOUT")
# shellcheck disable=SC2206
student_extra=($STUDENT_EXTRA)

check_criteria
stage "4/5 students: $(update_size "")"
for criterion in $CRITERIA; do
  stage "4/5 student --criterion $criterion -> $STUDENTS_DIR/$criterion"
  criterion_options "$criterion"
  init_options "$criterion"
  train_model "$STUDENTS_DIR/$criterion" "$DISTILL_DATA" "${model_args[@]}" "${optim[@]}" \
    --task distillation --ensemble-paths "$ENSEMBLE" "${crit[@]}" "${init[@]}" \
    --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE" \
    --valid-subset "$STUDENT_VALID_SUBSETS" --keep-last-epochs "$KEEP_LAST_EPOCHS" --seed "$SEED" \
    "${student_device_args[@]}" "${memory_efficient_fp16[@]}" "${extra[@]}" "${student_extra[@]}"
done
