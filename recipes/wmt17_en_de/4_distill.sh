#!/usr/bin/env bash
# Stage 4: one student per criterion in CRITERIA, trained on $DISTILL_DATA (the ensemble's
# translations) with `--task distillation`: the teachers run online on each batch and the criterion
# distils their token distributions. The paper's hyper-parameters (config.sh). Criteria listed in
# FINETUNE_FROM_KD start from the KD student (forward_kl_mean_distillation, which must come earlier
# in CRITERIA): from scratch they collapse to a flat Dirichlet (README, "Known behaviour").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

ENSEMBLE=$(ensemble)
mapfile -t optim < <(optim_args "$CLIP_NORM" "$DROPOUT")
# shellcheck disable=SC2206
student_extra=($STUDENT_EXTRA)

# criterion_args CRITERION: the criterion's own options
criterion_args() {
  case $1 in
    forward_kl_mean_distillation) ;;
    sequence_distribution_distillation) printf '%s\n' --model-offset "$MODEL_OFFSET" ;;
    dirichlet_proxy_distillation | rkl_dirichlet_proxy_distillation)
      printf '%s\n' --target-concentration "$TARGET_CONCENTRATION" --model-offset "$MODEL_OFFSET" \
        --target-offset "$TARGET_OFFSET" ;;
    *) echo "error: unknown criterion '$1' in CRITERIA" >&2; return 1 ;;
  esac
}

for criterion in $CRITERIA; do criterion_args "$criterion" > /dev/null; done  # fail early on a typo
for criterion in $CRITERIA; do
  save=$STUDENTS_DIR/$criterion
  stage "4/5 student --criterion $criterion -> $save"
  done_already "$save/done" && continue
  mapfile -t crit < <(criterion_args "$criterion")
  init=()
  if [[ " $FINETUNE_FROM_KD " == *" $criterion "* ]]; then
    kd=$STUDENTS_DIR/forward_kl_mean_distillation
    if [ "$DRY_RUN" != 1 ] && [ ! -e "$kd/done" ]; then
      echo "error: $criterion starts from the KD student, but $kd is not trained: put" \
        "forward_kl_mean_distillation before it in CRITERIA (or remove it from FINETUNE_FROM_KD)" >&2
      exit 1
    fi
    init=(--finetune-from-model "$kd/checkpoint_best.pt")
  fi
  run mkdir -p "$save"
  train "$DISTILL_DATA" "${model_args[@]}" "${optim[@]}" \
    --task distillation --ensemble-paths "$ENSEMBLE" --criterion "$criterion" "${crit[@]}" "${init[@]}" \
    --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE" \
    --valid-subset "$STUDENT_VALID_SUBSETS" --keep-last-epochs "$KEEP_LAST_EPOCHS" \
    --seed "$SEED" --save-dir "$save" --log-file "$save/train.log" --log-format simple \
    "${student_device_args[@]}" "${extra[@]}" "${student_extra[@]}"
  run touch "$save/done"
done
