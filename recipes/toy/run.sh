#!/usr/bin/env bash
# The embedded demo: a synthetic translation task with genuine ambiguity, a small teacher ensemble,
# a PD-EnD2 student and a KD (ensemble-mean) student, each decoded with fairseq-generate + sacrebleu.
# Runs on a CPU in a few minutes; re-running resumes (finished stages are skipped).
#   WORK=runs/toy  M=3  TEACHER_EPOCHS=20  STUDENT_EPOCHS=12  SEED=1  bash recipes/toy/run.sh
set -euo pipefail
WORK=${WORK:-runs/toy}
M=${M:-3}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-12}
SEED=${SEED:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
USER_DIR=$(fairseq-pdd-user-dir 2>/dev/null)
MODEL=(--arch transformer --encoder-layers 1 --decoder-layers 1
  --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
  --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.1)
OPTIM=(--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 50 --max-tokens 500
  --cpu --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints --num-workers 0)

stage() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$WORK"
LOG="$WORK/logs"; mkdir -p "$LOG"

stage "1/5 synthetic corpus -> $WORK/raw"
[ -f "$WORK/raw/test.tgt" ] || fairseq-pdd-toy-data "$WORK/raw" --seed "$SEED"

stage "2/5 fairseq-preprocess -> $WORK/bin"
[ -f "$WORK/bin/test.src-tgt.tgt.idx" ] || fairseq-preprocess --source-lang src --target-lang tgt \
  --trainpref "$WORK/raw/train" --validpref "$WORK/raw/valid" --testpref "$WORK/raw/test" \
  --destdir "$WORK/bin" --joined-dictionary --workers 1 > "$LOG/preprocess.log" 2>&1

TEACHERS=()
for m in $(seq 1 "$M"); do
  stage "3/5 teacher $m/$M (cross-entropy, seed $((SEED + m)))"
  fairseq-train "$WORK/bin" --user-dir "$USER_DIR" "${MODEL[@]}" "${OPTIM[@]}" --criterion cross_entropy \
    --max-epoch "$TEACHER_EPOCHS" --seed $((SEED + m)) --save-dir "$WORK/teacher$m" > "$LOG/teacher$m.log" 2>&1
  TEACHERS+=("$WORK/teacher$m/checkpoint_last.pt")
done
ENSEMBLE=$(IFS=:; echo "${TEACHERS[*]}")

for criterion in rkl_dirichlet_proxy_distillation forward_kl_mean_distillation; do
  stage "4/5 student: --task distillation --criterion $criterion"
  fairseq-train "$WORK/bin" --user-dir "$USER_DIR" "${MODEL[@]}" "${OPTIM[@]}" \
    --task distillation --ensemble-paths "$ENSEMBLE" --criterion "$criterion" \
    --max-epoch "$STUDENT_EPOCHS" --seed "$SEED" --save-dir "$WORK/student_$criterion" > "$LOG/student_$criterion.log" 2>&1
  grep "valid on 'valid'" "$LOG/student_$criterion.log" | tail -1 | sed 's/.*| loss/    valid: loss/' | cut -c1-160
done

bleu() {
  fairseq-generate "$WORK/bin" --user-dir "$USER_DIR" --path "$1" --beam 5 --batch-size 64 \
    --scoring sacrebleu --cpu 2>/dev/null | grep -o "BLEU = [0-9.]*" | cut -d' ' -f3
}
stage "5/5 fairseq-generate --beam 5 --scoring sacrebleu on test"
printf '\n%-40s %s\n' "model" "BLEU"
for m in $(seq 1 "$M"); do printf '%-40s %s\n' "teacher $m" "$(bleu "${TEACHERS[$((m - 1))]}")"; done
printf '%-40s %s\n' "ensemble of $M teachers" "$(bleu "$ENSEMBLE")"
for criterion in rkl_dirichlet_proxy_distillation forward_kl_mean_distillation; do
  printf '%-40s %s\n' "student $criterion" "$(bleu "$WORK/student_$criterion/checkpoint_last.pt")"
done
