#!/usr/bin/env bash
# The embedded demo, on a CPU in a few minutes: a synthetic translation task with genuine ambiguity
# (a quarter of the source words have two translations), a small teacher ensemble, a PD-EnD2 student
# and an EnD (KD to the ensemble mean) student, decoding with uncertainty on the in-domain test set and
# shifted ones (MT: permuted source words, source words never seen in training), and the evaluation
# report: BLEU of every model, OOD ROC-AUC and PRR per measure for the ensemble and both students.
# With --asr the same pipeline runs on synthetic speech (FLAC in LibriSpeech's layout -> fbank80 +
# sentencepiece -> tiny VGG-Transformers, WER; OOD = unseen words in another frequency band).
# Deterministic for a given SEED on one machine (one thread; another CPU model may round differently and
# change the numbers); re-running resumes (finished stages are skipped).
#   WORK=runs/toy  M=3  TEACHER_EPOCHS=20  STUDENT_EPOCHS=12  SEED=1  bash recipes/toy/run.sh [--asr]
set -euo pipefail
RECIPES=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=cpu
source "$RECIPES/lib.sh"
ASR=0
[ "${1:-}" = --asr ] && ASR=1
M=${M:-3}
SEED=${SEED:-1}
STUDENTS=(rkl_dirichlet_proxy_distillation forward_kl_mean_distillation)
COMMON_OPTIM=(--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 50
  --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints --num-workers 0)
DECODE=(--beam 5 --nbest 5 --batch-size 64 --required-batch-size-multiple 1 --cpu --quiet)
if [ "$ASR" = 1 ]; then
  WORK=${WORK:-runs/toy_asr}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-8}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-8}; N_OOD=${N_OOD:-40}
  MODEL=(--arch pdd_vggtransformer_tiny)
  OPTIM=("${COMMON_OPTIM[@]}" --max-tokens 300 --train-subset train --valid-subset dev)
  TEACHER_TASK=(--task speech_to_text); STUDENT_TASK=(--task asr_distillation)
  DECODE+=(--task speech_to_text --scoring wer); METRIC=WER; EVAL_TASK=asr
  SETS=(test:test ood:ood); OOD_ARGS=(--ood ood=ood.jsonl)
else
  WORK=${WORK:-runs/toy}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-12}; N_OOD=${N_OOD:-200}
  MODEL=(--arch transformer --encoder-layers 1 --decoder-layers 1
    --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
    --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.1)
  OPTIM=("${COMMON_OPTIM[@]}" --max-tokens 500)
  TEACHER_TASK=(); STUDENT_TASK=(--task distillation)
  DECODE+=(--scoring sacrebleu); METRIC=BLEU; EVAL_TASK=mt
  SETS=(test:test unseen:test1 perm:test2); OOD_ARGS=(--ood unseen=unseen.jsonl --ood perm=perm.jsonl)
fi
RAW="$WORK/raw"; BIN="$WORK/bin"; LOG="$WORK/logs"; DEC="$WORK/decodes"
mkdir -p "$LOG"

if [ "$ASR" = 1 ]; then
  stage "1/6 synthetic speech (FLAC, LibriSpeech layout) -> $RAW"
  done_already "$RAW/ood" || run fairseq-pdd-asr-toy-data "$RAW" --seed "$SEED" --ood "$N_OOD"
  stage "2/6 fbank80 + sentencepiece + manifests -> $BIN"
  done_already "$BIN/ood.tsv" || run fairseq-pdd-prepare-librispeech --root "$RAW" --subsets train,dev,test,ood \
    --out-dir "$BIN" --vocab-size 28 > "$LOG/prepare.log" 2>&1
else
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
fi

TEACHERS=()
for m in $(seq 1 "$M"); do
  stage "3/6 teacher $m/$M (cross-entropy, seed $((SEED + m)))"
  done_already "$WORK/teacher$m/checkpoint_last.pt" || train "$BIN" "${MODEL[@]}" "${OPTIM[@]}" \
    "${TEACHER_TASK[@]}" --criterion cross_entropy --max-epoch "$TEACHER_EPOCHS" --seed $((SEED + m)) \
    --save-dir "$WORK/teacher$m" > "$LOG/teacher$m.log" 2>&1
  TEACHERS+=("$WORK/teacher$m/checkpoint_last.pt")
done
ENSEMBLE=$(IFS=:; echo "${TEACHERS[*]}")

for criterion in "${STUDENTS[@]}"; do
  stage "4/6 student: ${STUDENT_TASK[*]} --criterion $criterion"
  done_already "$WORK/student_$criterion/checkpoint_last.pt" || train "$BIN" "${MODEL[@]}" "${OPTIM[@]}" \
    "${STUDENT_TASK[@]}" --ensemble-paths "$ENSEMBLE" --criterion "$criterion" --max-epoch "$STUDENT_EPOCHS" \
    --seed "$SEED" --save-dir "$WORK/student_$criterion" > "$LOG/student_$criterion.log" 2>&1
done

# system name -> checkpoint(s)
declare -A SYSTEMS=([ensemble]="$ENSEMBLE")
for m in $(seq 1 "$M"); do SYSTEMS[teacher$m]=${TEACHERS[$((m - 1))]}; done
SYSTEMS[pd_end2]="$WORK/student_rkl_dirichlet_proxy_distillation/checkpoint_last.pt"
SYSTEMS[end_kd]="$WORK/student_forward_kl_mean_distillation/checkpoint_last.pt"
ORDER=($(for m in $(seq 1 "$M"); do echo "teacher$m"; done) ensemble pd_end2 end_kd)

stage "5/6 fairseq-pdd-generate (beam 5, nbest 5) on ${SETS[*]%%:*}"
for name in "${ORDER[@]}"; do
  for set in "${SETS[@]}"; do
    out="$DEC/$name/${set%%:*}.jsonl"
    done_already "$out" || run fairseq-pdd-generate "$BIN" --user-dir "$USER_DIR" --path "${SYSTEMS[$name]}" \
      --gen-subset "${set#*:}" "${DECODE[@]}" --uncertainty-reference --uncertainty-output "$out" \
      > "$LOG/generate_${name}_${set%%:*}.log" 2>&1
  done
done

stage "6/6 fairseq-pdd-evaluate -> $WORK/report"
printf '\n%-22s %s\n' "model (test set)" "$METRIC"
for name in "${ORDER[@]}"; do
  printf '%-22s %s\n' "$name" "$(grep -oE '(BLEU =|WER:) [0-9.]*' "$LOG/generate_${name}_test.log" | awk '{print $NF}')"
done
echo
EVAL_SYSTEMS=()
for name in ensemble pd_end2 end_kd; do EVAL_SYSTEMS+=(--system "$name=$DEC/$name"); done
run fairseq-pdd-evaluate "${EVAL_SYSTEMS[@]}" --in-domain test.jsonl "${OOD_ARGS[@]}" \
  --task "$EVAL_TASK" --nbest all --weighting bs --out-dir "$WORK/report"
echo "report: $WORK/report/report.json, table: $WORK/report/report.txt, plots: $WORK/report/plots/"
