#!/usr/bin/env bash
# The embedded demo, on a CPU in a few minutes: a synthetic translation task with genuine ambiguity
# (a quarter of the source words have two translations), a small teacher ensemble, a PD-EnD2 student
# and an EnD (KD to the ensemble mean) student, decoding with uncertainty on the in-domain test set and
# two shifted ones (permuted source words; source words never seen in training), and the evaluation
# report: BLEU of every model, OOD ROC-AUC and PRR per measure for the ensemble and both students.
# Deterministic for a given SEED; re-running resumes (finished stages are skipped).
#   WORK=runs/toy  M=3  TEACHER_EPOCHS=20  STUDENT_EPOCHS=12  SEED=1  bash recipes/toy/run.sh
set -euo pipefail
RECIPES=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=cpu
source "$RECIPES/lib.sh"
WORK=${WORK:-runs/toy}
M=${M:-3}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-12}
SEED=${SEED:-1}
N_OOD=${N_OOD:-200}
STUDENTS=(rkl_dirichlet_proxy_distillation forward_kl_mean_distillation)
MODEL=(--arch transformer --encoder-layers 1 --decoder-layers 1
  --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
  --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.1)
OPTIM=(--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 50 --max-tokens 500
  --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints --num-workers 0)
DECODE=(--beam 5 --nbest 5 --batch-size 64 --required-batch-size-multiple 1 --scoring sacrebleu --cpu --quiet)
RAW="$WORK/raw"; BIN="$WORK/bin"; LOG="$WORK/logs"; DEC="$WORK/decodes"
mkdir -p "$LOG"

stage "1/6 synthetic corpus and shifted test sets -> $RAW"
if ! done_already "$RAW/perm.tgt"; then
  run fairseq-pdd-toy-data "$RAW" --seed "$SEED" --ood "$N_OOD"
  run python -m fairseq_pdd.evaluation.ood_sets permute --source "$RAW/test.src" --target "$RAW/test.tgt" \
    --out-source "$RAW/perm.src" --out-target "$RAW/perm.tgt" --seed "$SEED"
fi

stage "2/6 fairseq-preprocess -> $BIN (subsets test, test1 = unseen words, test2 = permuted)"
done_already "$BIN/test2.src-tgt.tgt.idx" || run fairseq-preprocess --source-lang src --target-lang tgt \
  --trainpref "$RAW/train" --validpref "$RAW/valid" --testpref "$RAW/test,$RAW/ood,$RAW/perm" \
  --destdir "$BIN" --joined-dictionary --workers 1 > "$LOG/preprocess.log" 2>&1

TEACHERS=()
for m in $(seq 1 "$M"); do
  stage "3/6 teacher $m/$M (cross-entropy, seed $((SEED + m)))"
  done_already "$WORK/teacher$m/checkpoint_last.pt" || train "$BIN" "${MODEL[@]}" "${OPTIM[@]}" \
    --criterion cross_entropy --max-epoch "$TEACHER_EPOCHS" --seed $((SEED + m)) \
    --save-dir "$WORK/teacher$m" > "$LOG/teacher$m.log" 2>&1
  TEACHERS+=("$WORK/teacher$m/checkpoint_last.pt")
done
ENSEMBLE=$(IFS=:; echo "${TEACHERS[*]}")

for criterion in "${STUDENTS[@]}"; do
  stage "4/6 student: --task distillation --criterion $criterion"
  done_already "$WORK/student_$criterion/checkpoint_last.pt" || train "$BIN" "${MODEL[@]}" "${OPTIM[@]}" \
    --task distillation --ensemble-paths "$ENSEMBLE" --criterion "$criterion" --max-epoch "$STUDENT_EPOCHS" \
    --seed "$SEED" --save-dir "$WORK/student_$criterion" > "$LOG/student_$criterion.log" 2>&1
done

# system name -> checkpoint(s)
declare -A SYSTEMS=([ensemble]="$ENSEMBLE")
for m in $(seq 1 "$M"); do SYSTEMS[teacher$m]=${TEACHERS[$((m - 1))]}; done
SYSTEMS[pd_end2]="$WORK/student_rkl_dirichlet_proxy_distillation/checkpoint_last.pt"
SYSTEMS[end_kd]="$WORK/student_forward_kl_mean_distillation/checkpoint_last.pt"
ORDER=($(for m in $(seq 1 "$M"); do echo "teacher$m"; done) ensemble pd_end2 end_kd)

stage "5/6 fairseq-pdd-generate (beam 5, nbest 5) on test, unseen and perm"
for name in "${ORDER[@]}"; do
  for set in test:test unseen:test1 perm:test2; do
    out="$DEC/$name/${set%%:*}.jsonl"
    done_already "$out" || run fairseq-pdd-generate "$BIN" --user-dir "$USER_DIR" --path "${SYSTEMS[$name]}" \
      --gen-subset "${set#*:}" "${DECODE[@]}" --uncertainty-reference --uncertainty-output "$out" \
      > "$LOG/generate_${name}_${set%%:*}.log" 2>&1
  done
done

stage "6/6 fairseq-pdd-evaluate -> $WORK/report"
printf '\n%-22s %s\n' "model (test set)" "sacreBLEU"
for name in "${ORDER[@]}"; do
  printf '%-22s %s\n' "$name" "$(grep -o 'BLEU = [0-9.]*' "$LOG/generate_${name}_test.log" | cut -d' ' -f3)"
done
echo
EVAL_SYSTEMS=()
for name in ensemble pd_end2 end_kd; do EVAL_SYSTEMS+=(--system "$name=$DEC/$name"); done
run fairseq-pdd-evaluate "${EVAL_SYSTEMS[@]}" --in-domain test.jsonl --ood unseen=unseen.jsonl \
  --ood perm=perm.jsonl --task mt --nbest all --weighting bs --out-dir "$WORK/report"
echo "report: $WORK/report/report.json, table: $WORK/report/report.txt, plots: $WORK/report/plots/"
