#!/usr/bin/env bash
# B-DISTIL-style progressive ensemble distillation on a synthetic task, with anytime decoding, beside
# two baselines trained in the same run. TASK=translation (default): the toy translation corpus,
# Transformer members, BLEU; TASK=speech: the toy speech corpus in LibriSpeech's layout
# (fairseq-pdd-prepare-librispeech), VGG-Transformer members (--arch bdistil_pdd_vggtransformer_tiny,
# --task asr_distillation / speech_to_text), WER.
#   boosted      member k trained with members 1..k-1 frozen (--arch bdistil_transformer,
#                --criterion bdistil_residual_kd); candidates tried from the cheapest up, accepted if
#                weighted edge >= GAMMA and the unweighted validation KL does not rise
#   independent  members trained alone (same sizes, other seeds), combined by a logit average
#   single       one model with about the parameters of all K boosted members
# fairseq's default --required-batch-size-multiple 8 leaves a last batch of fewer than 8 sentences
# out of fairseq-generate / fairseq-validate, so evaluation passes 1.
# Reports per k on the test set: parameters, BLEU (sacrebleu, beam 5) or WER, KL(teacher || model) and
# agreement with the teacher's argmax (fairseq-validate), generation time; ratios to the teacher
# ensemble, measured in the same run.
#   WORK=runs/bdistil K=3 CANDIDATES="16 32" EPOCHS=6 GAMMA=0.05 ETA=0.1 bash recipes/bdistil/run.sh
#   TASK=speech WORK=runs/bdistil_asr CANDIDATES="16 32" EPOCHS=4 bash recipes/bdistil/run.sh
#   DRY_RUN=1 bash recipes/bdistil/run.sh     # print the commands only
set -euo pipefail
TASK=${TASK:-translation}       # translation | speech
WORK=${WORK:-runs/bdistil}
K=${K:-3}                       # at most K rounds
CANDIDATES=${CANDIDATES:-"16 32"}  # member widths, cheapest first
EPOCHS=${EPOCHS:-6}             # epochs per member
LR=${LR:-1e-2}                  # members' learning rate
GAMMA=${GAMMA:-0.05}            # minimum weighted edge
ETA=${ETA:-0.1}                 # token-weight strength
CONNECTION=${CONNECTION:-none}  # none | last-hidden (members 2..K; translation only)
EARLY_STOP=${EARLY_STOP:-"0.5 0.9"}  # confidence thresholds for early-stopped decoding of all K boosted members
SINGLE_DIM=${SINGLE_DIM:-32}    # width of the single-model baseline (32: about three width-16 members)
M=${M:-2}                       # teachers
TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}
SEED=${SEED:-1}
DRY_RUN=${DRY_RUN:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}
USER_DIR=$($PY -c 'from fairseq_pdd.cli import user_dir; print(user_dir())' 2>/dev/null)
OPTIM=(--optimizer adam --lr-scheduler inverse_sqrt --warmup-updates 50 --max-tokens 500
  --cpu --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints --num-workers 0)
case "$TASK" in
  translation)
    DATA_TASK=(); KD_TASK=distillation; SCORING=sacrebleu; SCORE=BLEU; TEST=(); VALID_TEST=(--valid-subset test)
    TEACHER=(--arch transformer --encoder-layers 1 --decoder-layers 1
      --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
      --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.1)
    member() {  # MEMBER=(member architecture of width $1)
      MEMBER=(--arch bdistil_transformer --encoder-layers 1 --decoder-layers 1
        --encoder-embed-dim "$1" --decoder-embed-dim "$1" --encoder-ffn-embed-dim $((2 * $1))
        --decoder-ffn-embed-dim $((2 * $1)) --encoder-attention-heads 2 --decoder-attention-heads 2
        --share-decoder-input-output-embed --dropout 0.0)
    } ;;
  speech)
    # speech_to_text data: subsets train/dev/test; about 4 utterances (300 frames) per batch
    OPTIM=(--optimizer adam --lr-scheduler inverse_sqrt --warmup-updates 50 --max-tokens 300 --train-subset train
      --valid-subset dev --cpu --no-progress-bar --log-format simple --log-interval 100 --no-epoch-checkpoints
      --num-workers 0)
    DATA_TASK=(--task speech_to_text); KD_TASK=asr_distillation; SCORING=wer; SCORE=WER
    TEST=(--gen-subset test); VALID_TEST=(--valid-subset test)
    TEACHER=(--arch pdd_vggtransformer_tiny)
    member() {  # MEMBER=(VGG-Transformer member of width $1: one encoder and one decoder layer, no dropout)
      MEMBER=(--arch bdistil_pdd_vggtransformer_tiny --enc-output-dim "$1" --tgt-embed-dim "$1"
        --transformer-enc-config "(($1, 2, $((2 * $1)), True, 0.0, 0.0, 0.0),)" --conv-dec-config "(($1, 3, True),)"
        --transformer-dec-config "(($1, 2, $((2 * $1)), True, 0.0, 0.0, 0.0),)")
    } ;;
  *) echo "TASK must be translation or speech, not '$TASK'" >&2; exit 2 ;;
esac

stage() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# run LOG CMD...: run CMD with its output in LOG (DRY_RUN=1: print it, on stderr like the stages)
run() {
  local log=$1; shift
  if [ "$DRY_RUN" = 1 ]; then { printf '%q ' "$@"; echo "> $log"; } >&2; else "$@" > "$log" 2>&1; fi
}
[ "$DRY_RUN" = 1 ] || mkdir -p "$WORK/logs"
LOG="$WORK/logs"

if [ "$TASK" = translation ]; then
  stage "corpus and fairseq-preprocess -> $WORK/bin"
  [ -f "$WORK/raw/test.tgt" ] || run "$LOG/corpus.log" $PY -m fairseq_pdd.data.toy_mt "$WORK/raw" --seed "$SEED"
  [ -f "$WORK/bin/test.src-tgt.tgt.idx" ] || run "$LOG/preprocess.log" fairseq-preprocess --source-lang src \
    --target-lang tgt --trainpref "$WORK/raw/train" --validpref "$WORK/raw/valid" --testpref "$WORK/raw/test" \
    --destdir "$WORK/bin" --joined-dictionary --workers 1
else
  stage "speech corpus (LibriSpeech layout) and fairseq-pdd-prepare-librispeech -> $WORK/bin"
  [ -d "$WORK/raw/test" ] || run "$LOG/corpus.log" $PY -m fairseq_pdd.data.toy_asr "$WORK/raw" --ood 0 --seed "$SEED"
  [ -f "$WORK/bin/test.tsv" ] || run "$LOG/prepare.log" $PY -m fairseq_pdd.data.librispeech --root "$WORK/raw" \
    --subsets train,dev,test --out-dir "$WORK/bin" --vocab-size 28
fi

TEACHERS=()
for m in $(seq 1 "$M"); do
  stage "teacher $m/$M"
  [ -f "$WORK/teacher$m/checkpoint_last.pt" ] || run "$LOG/teacher$m.log" fairseq-train "$WORK/bin" \
    --user-dir "$USER_DIR" ${DATA_TASK[@]+"${DATA_TASK[@]}"} "${TEACHER[@]}" "${OPTIM[@]}" --lr 3e-3 --criterion cross_entropy \
    --max-epoch "$TEACHER_EPOCHS" --seed $((SEED + m)) --save-dir "$WORK/teacher$m"
  TEACHERS+=("$WORK/teacher$m/checkpoint_last.pt")
done
ENSEMBLE=$(IFS=:; echo "${TEACHERS[*]}")
KD=(--task "$KD_TASK" --ensemble-paths "$ENSEMBLE" --criterion bdistil_residual_kd --bdistil-eta "$ETA"
  --lr "$LR" --max-epoch "$EPOCHS")

MEMBERS=(); WIDTHS=()
for k in $(seq 1 "$K"); do
  accepted=""
  for d in $CANDIDATES; do
    save="$WORK/round$k/d$d"
    stage "round $k: candidate width $d on top of ${#MEMBERS[@]} frozen members"
    extra=()
    if [ ${#MEMBERS[@]} -gt 0 ]; then
      extra=(--bdistil-members "$(IFS=:; echo "${MEMBERS[*]}")" --bdistil-connection "$CONNECTION")
    fi
    member "$d"
    [ -f "$save/checkpoint_last.pt" ] || run "$LOG/round${k}_d$d.log" fairseq-train "$WORK/bin" \
      --user-dir "$USER_DIR" "${MEMBER[@]}" "${OPTIM[@]}" "${KD[@]}" ${extra[@]+"${extra[@]}"} \
      --seed $((SEED + 10 * k)) --save-dir "$save"
    if [ "$DRY_RUN" = 1 ] || $PY -m fairseq_pdd.bdistil.cli accept "$LOG/round${k}_d$d.log" --gamma "$GAMMA"; then
      accepted="$save/checkpoint_last.pt"; WIDTHS+=("$d"); break
    fi
  done
  if [ -z "$accepted" ]; then stage "round $k: no candidate passed the acceptance rule; stopping at $((k - 1)) members"; break; fi
  MEMBERS+=("$accepted")
done
K=${#MEMBERS[@]}
[ "$K" -gt 0 ] || { echo "no member was accepted" >&2; exit 1; }
BOOSTED=${MEMBERS[$((K - 1))]}

stage "baseline: independent members (round 1's member, then the same widths with other seeds)"
INDEPENDENT=("${MEMBERS[0]}")
for k in $(seq 2 "$K"); do
  d=${WIDTHS[$((k - 1))]}
  save="$WORK/independent$k"
  member "$d"
  [ -f "$save/checkpoint_last.pt" ] || run "$LOG/independent$k.log" fairseq-train "$WORK/bin" \
    --user-dir "$USER_DIR" "${MEMBER[@]}" "${OPTIM[@]}" "${KD[@]}" --seed $((SEED + 100 * k)) --save-dir "$save"
  INDEPENDENT+=("$save/checkpoint_last.pt")
done
AVERAGE="$WORK/independent_average.pt"
run "$LOG/assemble.log" $PY -m fairseq_pdd.bdistil.cli assemble "$AVERAGE" "${INDEPENDENT[@]}" --combine mean

stage "baseline: one model of width $SINGLE_DIM"
SINGLE="$WORK/single/checkpoint_last.pt"
member "$SINGLE_DIM"
[ -f "$SINGLE" ] || run "$LOG/single.log" fairseq-train "$WORK/bin" --user-dir "$USER_DIR" \
  "${MEMBER[@]}" "${OPTIM[@]}" "${KD[@]}" --seed "$SEED" --save-dir "$WORK/single"

stage "evaluation on test: fairseq-validate (KL, agreement) and fairseq-generate ($SCORE, time) per k"
# evaluate NAME K PATH [TAU]: one row of the table (K = 0: all members; the teacher ensemble has no KL
# row). With TAU: decoded by fairseq-pdd-generate with early stopping at confidence TAU; its KL and
# agreement are not measured (fairseq-validate scores the plain prefix), its members column is the
# mean number of members per decoded token.
ROWS="$WORK/table.tsv"
evaluate() {
  local name=$1 k=$2 path=$3 tau=${4:-} overrides params kl=- agreement=- gen score seconds members=$2 prefix=()
  local tool=fairseq-generate log="$LOG/gen_${name}_$k.log" extra=()
  overrides="{'bdistil_prefix': $k}"
  if [ -n "$tau" ]; then
    tool=fairseq-pdd-generate; log="$LOG/gen_${name}_${k}_tau$tau.log"
    overrides="{'bdistil_prefix': $k, 'bdistil_early_stop_confidence': $tau}"
    extra=(--uncertainty-output "$WORK/uncertainty_${name}_${k}_tau$tau.jsonl")
  fi
  [ "$name" = teacher ] || prefix=(--model-overrides "$overrides")
  run "$log" "$tool" "$WORK/bin" --user-dir "$USER_DIR" ${DATA_TASK[@]+"${DATA_TASK[@]}"} \
    ${TEST[@]+"${TEST[@]}"} --path "$path" --beam 5 --batch-size 64 --required-batch-size-multiple 1 \
    --scoring "$SCORING" --cpu ${prefix[@]+"${prefix[@]}"} ${extra[@]+"${extra[@]}"}
  [ "$DRY_RUN" = 1 ] && return 0
  if [ "$TASK" = translation ]; then score=$(grep -o "BLEU = [0-9.]*" "$log" | cut -d' ' -f3)
  else score=$(sed -nE 's/.*WER: ([0-9.]+).*/\1/p' "$log"); fi
  seconds=$(sed -nE 's/.*Translated .* tokens\) in ([0-9.]+)s.*/\1/p' "$log")
  if [ "$name" = teacher ]; then
    kl=0; agreement=1; members=$M
    params=0; for t in "${TEACHERS[@]}"; do params=$((params + $($PY -m fairseq_pdd.bdistil.cli params "$t"))); done
  else
    if [ -n "$tau" ]; then
      members=$(sed -nE 's/^bdistil early stop .*: ([0-9.]+) members per hypothesis token.*/\1/p' "$log")
    else
      fairseq-validate "$WORK/bin" --user-dir "$USER_DIR" --task "$KD_TASK" "${VALID_TEST[@]}" --path "$path" \
        --max-tokens 2000 --required-batch-size-multiple 1 --cpu --model-overrides "$overrides" > "$LOG/valid_${name}_$k.log" 2>&1
      read -r kl agreement < <($PY -c 'import json,sys; m=json.load(sys.stdin); print(m["kl_teacher"], m["agreement"])' \
        < <($PY -m fairseq_pdd.bdistil.cli metrics "$LOG/valid_${name}_$k.log"))
    fi
    params=$($PY -m fairseq_pdd.bdistil.cli params "$path" --prefix "$k")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name${tau:+ tau=$tau}" "$k" "$params" "$score" "$kl" "$agreement" "$seconds" "$members" >> "$ROWS"
}
[ "$DRY_RUN" = 1 ] || : > "$ROWS"
evaluate teacher 0 "$ENSEMBLE"
for k in $(seq 1 "$K"); do
  evaluate boosted "$k" "$BOOSTED"
  evaluate independent "$k" "$AVERAGE"
done
for tau in $EARLY_STOP; do
  evaluate boosted "$K" "$BOOSTED" "$tau"
done
evaluate single 1 "$SINGLE"
[ "$DRY_RUN" = 1 ] && exit 0

echo
awk -F'\t' -v score="$SCORE" 'NR == 1 { tp = $3; tt = $7 }
  BEGIN { printf "%-18s %2s %8s %7s %7s %7s %9s %7s %7s %7s\n", "system", "k", "params", score, "KL", "agree", "gen_s", "params/T", "time/T", "members" }
  { printf "%-18s %2s %8d %7.2f %7s %7s %9.2f %7.3f %7.3f %7.2f\n", $1, $2, $3, $4, $5, $6, $7, $3 / tp, $7 / tt, $8 }' "$ROWS"
echo "(teacher = the ensemble of $M teachers; KL = KL(teacher mean || model) per token; gen_s = fairseq-generate's own time;"
echo " members = members run per decoded token: k, or its mean with early stopping at confidence tau)"
