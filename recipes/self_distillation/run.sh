#!/usr/bin/env bash
# Self-distillation with ground-truth mixing (Borup & Andersen, 2021), a chain of STEPS steps, for
# translation (TASK=mt, default) or speech recognition (TASK=asr).
# Step 0 is supervised (cross-entropy); step s trains a fresh model with --criterion
# gt_mixed_self_distillation against a * onehot(y) + (1 - a) * (step s-1), the previous step loaded
# as the frozen teacher by --task distillation (speech: asr_distillation) --ensemble-paths. With
# GT_WEIGHT=auto, a is chosen per step on the validation subset: an a = 0 student is trained and
# python -m fairseq_pdd.self_distillation.estimate_gt_weight mixes it with step 0 (the a = 1 student). Each step is then
# decoded with fairseq-pdd-generate (beam search + the forced reference; speech: --scoring wer) and
# python -m fairseq_pdd.self_distillation.chain_report prints the per-step table: a, BLEU (speech: WER), gold NLL,
# entropy, accuracy, ECE.
#
# By default it runs on a toy corpus with noisy training labels (NOISE of the training target words
# replaced at random; validation and test clean), a few minutes on a CPU: the toy translation corpus
# (fairseq_pdd.data.toy_mt), or for TASK=asr the toy speech corpus (fairseq_pdd.data.toy_asr, prepared by
# fairseq_pdd.data.librispeech) and a tiny VGG-Transformer. To use your own data, set DATA to a
# fairseq-preprocess'd directory (speech: prepared by recipes/librispeech/prepare.sh), the subsets, and
# MODEL_ARGS / TRAIN_ARGS / GEN_ARGS to your options.
#
#   WORK=runs/self_distillation STEPS=3 GT_WEIGHT=auto bash recipes/self_distillation/run.sh
#   GT_WEIGHT=0.5 TEACHER_CHECKPOINT=best bash recipes/self_distillation/run.sh
#   TASK=asr WORK=runs/self_distillation_asr bash recipes/self_distillation/run.sh
#   TASK=asr DATA=runs/librispeech/data TRAIN_SUBSET=train-clean-100 VALID_SUBSET=dev-clean \
#     EVAL_SUBSET=test-clean MODEL_ARGS="--arch pdd_vggtransformer_2" TRAIN_ARGS="..." bash recipes/self_distillation/run.sh
#   DRY_RUN=1 bash recipes/self_distillation/run.sh    # print the commands only (on stderr)
#
# Variables: TASK (mt | asr), WORK, STEPS (3), GT_WEIGHT (auto | a number in [0, 1]; 1 = supervised),
# GT_METHOD (nll | brier), TEACHER_CHECKPOINT (last | best), EPOCHS (mt 40, asr 15), SEED (1), NOISE
# (0.3), TRAIN, VALID, TEST (toy corpus sizes; mt 300/200/200, asr 240/40/40), VOCAB (toy vocabulary
# size; mt 20, asr 28 sentencepiece units), DATA, TRAIN_SUBSET (train), VALID_SUBSET (mt valid, asr
# dev), EVAL_SUBSET (test), BEAM (5), MODEL_ARGS, TRAIN_ARGS, GEN_ARGS, PYTHON, DRY_RUN.
# Re-running resumes: finished trainings and decodes are skipped.
set -euo pipefail
TASK=${TASK:-mt}
WORK=${WORK:-runs/self_distillation}
STEPS=${STEPS:-3}
GT_WEIGHT=${GT_WEIGHT:-auto}
GT_METHOD=${GT_METHOD:-nll}
TEACHER_CHECKPOINT=${TEACHER_CHECKPOINT:-last}
SEED=${SEED:-1}
NOISE=${NOISE:-0.3}
TRAIN_SUBSET=${TRAIN_SUBSET:-train}
EVAL_SUBSET=${EVAL_SUBSET:-test}
BEAM=${BEAM:-5}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
GEN_ARGS=${GEN_ARGS:---batch-size 64 --cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The toy models: no dropout, small batches, so that step 0 memorises the label noise.
case "$TASK" in
  mt)
    SUPERVISED_TASK=translation DISTIL_TASK=distillation TOY_DATA=$WORK/bin DATA_MARKER=dict.tgt.txt
    VALID_SUBSET=${VALID_SUBSET:-valid} EPOCHS=${EPOCHS:-40}
    TRAIN=${TRAIN:-300} VALID=${VALID:-200} TEST=${TEST:-200} VOCAB=${VOCAB:-20}
    DECODE=()
    MODEL_ARGS=${MODEL_ARGS:---arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64
      --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 4
      --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0}
    TRAIN_ARGS=${TRAIN_ARGS:---optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 50
      --max-tokens 200 --cpu --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints
      --num-workers 0} ;;
  asr)
    SUPERVISED_TASK=speech_to_text DISTIL_TASK=asr_distillation TOY_DATA=$WORK/data DATA_MARKER=config.yaml
    VALID_SUBSET=${VALID_SUBSET:-dev} EPOCHS=${EPOCHS:-15}
    TRAIN=${TRAIN:-240} VALID=${VALID:-40} TEST=${TEST:-40} VOCAB=${VOCAB:-28}
    DECODE=(--task speech_to_text --scoring wer)
    # --required-batch-size-multiple 1: with fairseq's default of 8, fairseq's batch_by_size drops a
    # subset's last batch when its size is not a multiple of 8 (fairseq issue #5036)
    MODEL_ARGS=${MODEL_ARGS:---arch pdd_vggtransformer_tiny --transformer-enc-config ((64,4,128,True,0,0,0),)
      --transformer-dec-config ((64,4,128,True,0,0,0),)}
    TRAIN_ARGS=${TRAIN_ARGS:---optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 50
      --max-tokens 300 --required-batch-size-multiple 1 --cpu --no-progress-bar --log-format simple
      --log-interval 100 --no-epoch-checkpoints --num-workers 0} ;;
  *) echo "TASK must be mt or asr, got '$TASK'" >&2; exit 2 ;;
esac
TOY=0
[ -n "${DATA:-}" ] || { TOY=1; DATA=$TOY_DATA; }

case "$GT_WEIGHT" in auto) ;; *[!0-9.]* | "" | .) echo "GT_WEIGHT must be 'auto' or a number in [0, 1], got '$GT_WEIGHT'" >&2; exit 2 ;; esac
case "$TEACHER_CHECKPOINT" in last | best) ;; *) echo "TEACHER_CHECKPOINT must be last or best, got '$TEACHER_CHECKPOINT'" >&2; exit 2 ;; esac
if [ "$DRY_RUN" = 1 ]; then USER_DIR='$(fairseq-pdd-user-dir)'; else USER_DIR=$(fairseq-pdd-user-dir); fi
LOG="$WORK/logs"

stage() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# run LOGFILE CMD...: run CMD with its output in LOGFILE, or print it with DRY_RUN=1.
run() {
  local log=$1; shift
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" >&2; echo "> $log" >&2; return; fi
  "$@" > "$log" 2>&1 || { echo "failed, see $log:" >&2; tail -20 "$log" >&2; exit 1; }
}
checkpoint() { echo "$WORK/$1/checkpoint_$TEACHER_CHECKPOINT.pt"; }
# train NAME EXTRA...: fairseq-train into $WORK/NAME unless its checkpoint exists.
train() {
  local name=$1; shift
  if [ "$DRY_RUN" != 1 ] && [ -f "$(checkpoint "$name")" ]; then stage "  $name: done before"; return; fi
  # shellcheck disable=SC2086  # MODEL_ARGS / TRAIN_ARGS are option lists
  run "$LOG/$name.log" fairseq-train "$DATA" --user-dir "$USER_DIR" $MODEL_ARGS $TRAIN_ARGS \
    --train-subset "$TRAIN_SUBSET" --valid-subset "$VALID_SUBSET" --max-epoch "$EPOCHS" --save-dir "$WORK/$name" "$@"
}

[ "$DRY_RUN" = 1 ] || mkdir -p "$LOG" "$WORK/eval"
if [ "$TOY" = 1 ]; then
  stage "toy $TASK corpus with label noise $NOISE on the training references -> $WORK/raw, $DATA"
  if [ "$DRY_RUN" = 1 ] || [ ! -f "$DATA/$DATA_MARKER" ]; then
    if [ "$TASK" = mt ]; then
      run "$LOG/toy_data.log" "$PYTHON" -m fairseq_pdd.data.toy_mt "$WORK/raw" --train "$TRAIN" --valid "$VALID" \
        --test "$TEST" --vocab-size "$VOCAB" --ambiguous-fraction 0 --label-noise "$NOISE" --seed "$SEED"
      run "$LOG/preprocess.log" fairseq-preprocess --source-lang src --target-lang tgt --trainpref "$WORK/raw/train" \
        --validpref "$WORK/raw/valid" --testpref "$WORK/raw/test" --destdir "$DATA" --joined-dictionary --workers 1
    else
      run "$LOG/toy_data.log" "$PYTHON" -m fairseq_pdd.data.toy_asr "$WORK/raw" --train "$TRAIN" --dev "$VALID" \
        --test "$TEST" --ood 0 --label-noise "$NOISE" --seed "$SEED"
      run "$LOG/prepare.log" "$PYTHON" -m fairseq_pdd.data.librispeech --root "$WORK/raw" --subsets train,dev,test \
        --out-dir "$DATA" --vocab-size "$VOCAB"
    fi
  fi
fi

stage "step 0: supervised (cross-entropy)"
train step0 --task "$SUPERVISED_TASK" --criterion cross_entropy --seed "$SEED"
WEIGHTS=1
for s in $(seq 1 "$STEPS"); do
  teacher=$(checkpoint "step$((s - 1))")
  distil=(--task "$DISTIL_TASK" --ensemble-paths "$teacher" --criterion gt_mixed_self_distillation --seed $((SEED + s)))
  a=$GT_WEIGHT
  if [ "$GT_WEIGHT" = auto ]; then
    stage "step $s: the a = 0 student, then a on subset $VALID_SUBSET ($GT_METHOD)"
    train "step$s-a0" "${distil[@]}" --gt-weight 0
    estimate="$WORK/step$s-a0/gt_weight.json"
    if [ "$DRY_RUN" = 1 ]; then
      run "$estimate" "$PYTHON" -m fairseq_pdd.self_distillation.estimate_gt_weight "$DATA" --path-a0 "$(checkpoint "step$s-a0")" \
        --path-a1 "$(checkpoint step0)" --method "$GT_METHOD" --subset "$VALID_SUBSET"
      a='$A'
    else
      [ -s "$estimate" ] || "$PYTHON" -m fairseq_pdd.self_distillation.estimate_gt_weight "$DATA" --path-a0 "$(checkpoint "step$s-a0")" \
        --path-a1 "$(checkpoint step0)" --method "$GT_METHOD" --subset "$VALID_SUBSET" > "$estimate" 2> "$LOG/step$s-estimate.log"
      a=$("$PYTHON" -c "import json, sys; print(round(json.load(open(sys.argv[1]))['gt_weight'], 4))" "$estimate")
    fi
  fi
  stage "step $s: a = $a, teacher $teacher"
  train "step$s" "${distil[@]}" --gt-weight "$a"
  WEIGHTS="$WEIGHTS,$a"
done

JSONLS=()
for s in $(seq 0 "$STEPS"); do
  out="$WORK/eval/step$s-$EVAL_SUBSET.jsonl"
  JSONLS+=("$out")
  if [ "$DRY_RUN" != 1 ] && [ -s "$out" ]; then continue; fi
  stage "decode step $s on $EVAL_SUBSET (beam $BEAM, forced references)"
  # shellcheck disable=SC2086  # GEN_ARGS is an option list
  run "$LOG/generate-step$s.log" fairseq-pdd-generate "$DATA" --user-dir "$USER_DIR" --path "$(checkpoint "step$s")" \
    --gen-subset "$EVAL_SUBSET" --beam "$BEAM" $GEN_ARGS "${DECODE[@]}" --uncertainty-reference \
    --uncertainty-output "$out" --quiet
done

stage "per-step table on $EVAL_SUBSET (chain with GT_WEIGHT=$GT_WEIGHT)"
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "$PYTHON" -m fairseq_pdd.self_distillation.chain_report "${JSONLS[@]}" --gt-weights "$WEIGHTS" --task "$TASK" --json "$WORK/chain.json" >&2
  echo >&2
else
  "$PYTHON" -m fairseq_pdd.self_distillation.chain_report "${JSONLS[@]}" --gt-weights "$WEIGHTS" --task "$TASK" --json "$WORK/chain.json"
fi
