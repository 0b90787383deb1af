#!/usr/bin/env bash
# The embedded demo, on a CPU in a few minutes: a synthetic translation task with genuine ambiguity
# (a quarter of the source words have two translations), a small teacher ensemble, a PD-EnD2 student
# and an EnD (KD to the ensemble mean) student, decoding with uncertainty on the in-domain test set and
# shifted ones (MT: permuted source words, source words never seen in training), and the evaluation
# report: BLEU of every model, OOD ROC-AUC and PRR per measure for the ensemble and both students.
# With --asr the same pipeline runs on synthetic speech (FLAC in LibriSpeech's layout -> fbank80 +
# sentencepiece -> tiny VGG-Transformers, WER; OOD = unseen words in another frequency band).
# Deterministic for a given SEED on one machine (one thread; another CPU model may round differently and
# change the numbers); re-running resumes (finished stages are skipped). Students train for twice the
# teachers' epochs, with a learning rate decaying to 0: at 12 epochs every student (PD-EnD2, KD and
# cross-entropy alike) is still in the steep part of its learning curve, where the seed moves BLEU by 10
# points; at 20 the PD-EnD2 student's BLEU spreads by std 2.7 over 5 seeds, at 40 by 1.4 (0.6 with its
# default offset 0), at 60 by 0.8.
# The in-domain test set has N_TEST sentences (1000): on 100 a bootstrap of the test set alone moves every
# system's BLEU by 3-4 points (benchmarks/seed_study.py measures both).
#   WORK=runs/toy  M=3  TEACHER_EPOCHS=20  STUDENT_EPOCHS=40  N_TEST=1000  SEED=1  bash recipes/toy/run.sh [--asr]
# CRITERIA lists the students (as in the paper-scale recipes, ../lib.sh). EnD2's NLL
# (sequence_distribution_distillation, system end2) and the forward KL to the proxy
# (dirichlet_proxy_distillation, system fkl_proxy) train from scratch here (MT), in ANNEAL_CRITERIA: the
# temperature annealed from INIT_TEMP (5) to 1 over updates ANNEAL_START (0) .. ANNEAL_END (6/7 of the
# students' updates), the proxy's precision capped at MAX_TARGET_PRECISION (100, about K) and EnD2's loss
# per token divided by the student's precision (DIVIDE_BY_PRECISION=1); both then reach the KD student's
# BLEU (docs/errors.md, "EnD2 and the forward KL to the proxy from scratch"). FINETUNE_FROM_KD="sequence_distribution_distillation ..." starts them
# from the KD student instead (list KD before them). With --asr the former settings stay (not measured), e.g.
#   CRITERIA="forward_kl_mean_distillation rkl_dirichlet_proxy_distillation sequence_distribution_distillation
#   dirichlet_proxy_distillation" bash recipes/toy/run.sh
set -euo pipefail
RECIPES=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=cpu
ASR=0
[ "${1:-}" = --asr ] && ASR=1
if [ "$ASR" = 0 ]; then
  # the from-scratch students of the MT demo (measured: docs/errors.md); ANNEAL_END "auto" = 6/7 of the
  # students' updates (994 of 1160 measured), known once teacher 1 has trained (a dry run prints "auto")
  : "${FINETUNE_FROM_KD=}" "${ANNEAL_CRITERIA=sequence_distribution_distillation dirichlet_proxy_distillation}"
  : "${INIT_TEMP:=5}" "${ANNEAL_START:=0}" "${ANNEAL_END:=auto}"
  : "${MAX_TARGET_PRECISION=100}" "${DIVIDE_BY_PRECISION=1}"
else
  # speech: the annealing window tried on 12-epoch MT students (not tuned for ASR); the KD warm start
  : "${INIT_TEMP:=10}" "${ANNEAL_START:=0}" "${ANNEAL_END:=300}"
fi
source "$RECIPES/lib.sh"
M=${M:-3}
SEED=${SEED:-1}
# system name of each criterion's student
declare -A STUDENT_NAME=([rkl_dirichlet_proxy_distillation]=pd_end2 [forward_kl_mean_distillation]=end_kd
  [sequence_distribution_distillation]=end2 [dirichlet_proxy_distillation]=fkl_proxy)
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
  WORK=${WORK:-runs/toy}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-40}; N_OOD=${N_OOD:-200}
  N_TEST=${N_TEST:-1000}
  MODEL=(--arch transformer --encoder-layers 1 --decoder-layers 1
    --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
    --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.1)
  OPTIM=("${COMMON_OPTIM[@]}" --max-tokens 500)
  TEACHER_TASK=(); STUDENT_TASK=(--task distillation)
  # hypotheses of at most MAX_LEN_A x source + MAX_LEN_B words, as in the WMT17 recipe (../lib.sh)
  DECODE+=(--scoring sacrebleu --max-len-a "${MAX_LEN_A:-1.2}" --max-len-b "${MAX_LEN_B:-10}"); METRIC=BLEU; EVAL_TASK=mt
  SETS=(test:test unseen:test1 perm:test2); OOD_ARGS=(--ood unseen=unseen.jsonl --ood perm=perm.jsonl)
fi
RAW="$WORK/raw"; BIN="$WORK/bin"; LOG="$WORK/logs"; DEC="$WORK/decodes"; STUDENTS_DIR="$WORK/students"
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
    run fairseq-pdd-toy-data "$RAW" --seed "$SEED" --ood "$N_OOD" --test "$N_TEST"
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

# MT students: the learning rate decays linearly to 0 over their STUDENT_EPOCHS (the updates per epoch read
# from teacher 1's log: the same data and batches), so the last checkpoint is not a snapshot of a noisy
# iterate; at 20 epochs with inverse_sqrt the three seeds' PD-EnD2 BLEU spread 4.1 (std), with the decay 2.1
# (seed_study).
STUDENT_SCHEDULE=()
if [ "$ASR" = 0 ] && [ "$DRY_RUN" != 1 ]; then
  updates=$(grep -o 'num_updates [0-9]*' "$LOG/teacher1.log" | tail -1 | awk '{print $2}')
  if [ -z "$updates" ]; then
    echo "error: no 'num_updates' in $LOG/teacher1.log to size the students' learning-rate decay" \
      "(remove $WORK/teacher1 to retrain it)" >&2
    exit 1
  fi
  student_updates=$((updates / TEACHER_EPOCHS * STUDENT_EPOCHS))
  STUDENT_SCHEDULE=(--lr-scheduler polynomial_decay --end-learning-rate 0 --total-num-update "$student_updates")
  [ "$ANNEAL_END" != auto ] || ANNEAL_END=$((student_updates * 6 / 7))
fi

check_criteria
# system name -> checkpoint(s)
declare -A SYSTEMS=([ensemble]="$ENSEMBLE")
for m in $(seq 1 "$M"); do SYSTEMS[teacher$m]=${TEACHERS[$((m - 1))]}; done
ORDER=($(for m in $(seq 1 "$M"); do echo "teacher$m"; done) ensemble)
STUDENT_SYSTEMS=()
for criterion in $CRITERIA; do
  stage "4/6 student: ${STUDENT_TASK[*]} --criterion $criterion"
  criterion_options "$criterion"
  init_options "$criterion"
  train_model "$STUDENTS_DIR/$criterion" "$BIN" "${MODEL[@]}" "${OPTIM[@]}" "${STUDENT_SCHEDULE[@]}" "${STUDENT_TASK[@]}" \
    --ensemble-paths "$ENSEMBLE" "${crit[@]}" "${init[@]}" --max-epoch "$STUDENT_EPOCHS" --seed "$SEED" \
    > "$LOG/student_$criterion.log" 2>&1
  name=${STUDENT_NAME[$criterion]:-$criterion}  # a criterion without a short name is its own system name
  SYSTEMS[$name]="$STUDENTS_DIR/$criterion/checkpoint_last.pt"
  STUDENT_SYSTEMS+=("$name")
done
ORDER+=("${STUDENT_SYSTEMS[@]}")

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
for name in ensemble "${STUDENT_SYSTEMS[@]}"; do EVAL_SYSTEMS+=(--system "$name=$DEC/$name"); done
run fairseq-pdd-evaluate "${EVAL_SYSTEMS[@]}" --in-domain test.jsonl "${OOD_ARGS[@]}" \
  --task "$EVAL_TASK" --nbest all --weighting bs --out-dir "$WORK/report"
echo "report: $WORK/report/report.json, table: $WORK/report/report.txt, plots: $WORK/report/plots/"
