#!/usr/bin/env bash
# Stage 5: decode test and the OOD sets with the ensemble and each student (fairseq-pdd-generate:
# beam BEAM, n-best NBEST, sentencepiece detokenised output, sacreBLEU, uncertainty of every
# hypothesis and of the forced references), then fairseq-pdd-evaluate: BLEU with its signature, OOD
# ROC-AUC / PR-AUC per measure, PRR against sentence BLEU, ECE, plots -> $EVAL_DIR/test/report.json.
# With EVAL_ENS_PRED=1 the students are also scored against the ensemble's translations of test
# (test_ens_pred) -> $EVAL_DIR/test_ens_pred/report.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

[ "$NODE_RANK" = 0 ] || exit 0  # decoding runs on one node

mapfile -t ood < <(ood_names)
# decode NAME CHECKPOINTS DATA SUBSET: $DECODE_DIR/NAME/uncertainty-SUBSET.jsonl (+ generate-SUBSET.txt)
decode() {
  local name=$1 path=$2 data=$3 subset=$4
  local out=$DECODE_DIR/$name
  done_already "$out/uncertainty-$subset.jsonl" && return 0
  run fairseq-pdd-generate "$data" --user-dir "$USER_DIR" --path "$path" --gen-subset "$subset" \
    --beam "$BEAM" --nbest "$NBEST" --max-tokens "$GEN_MAX_TOKENS" \
    --bpe sentencepiece --sentencepiece-model "$SPM_MODEL" --scoring sacrebleu --uncertainty-reference \
    --results-path "$out" --distributed-world-size 1 "${gen_args[@]}" "${gen_extra[@]}"
}

# evaluate OUT_DIR IN_DOMAIN [ARGS...]: the report (ARGS: --system, --ood, ...), written to OUT_DIR as a whole
evaluate() {
  local out=$1 in_domain=$2
  shift 2
  done_already "$out/report.json" && return 0
  run rm -rf "$out.tmp"
  run fairseq-pdd-evaluate "$@" --in-domain "$in_domain" --task mt --nbest "$EVAL_NBEST" \
    --weighting "$EVAL_WEIGHTING" --out-dir "$out.tmp"
  run rm -rf "$out"
  run mv "$out.tmp" "$out"
}

systems=(ensemble) paths=("$(ensemble)")
for criterion in $CRITERIA; do
  systems+=("$criterion") paths+=("$(ensemble_paths "$STUDENTS_DIR/$criterion")")
done
system_args=() ood_args=()
for i in "${!systems[@]}"; do
  name=${systems[$i]}
  for subset in test "${ood[@]}"; do
    stage "5/5 decode $subset with $name"
    decode "$name" "${paths[$i]}" "$DATA" "$subset"
  done
  system_args+=(--system "$name=$DECODE_DIR/$name")
done
for subset in "${ood[@]}"; do ood_args+=(--ood "$subset=uncertainty-$subset.jsonl"); done

stage "5/5 evaluate: BLEU, OOD detection, error detection, calibration -> $EVAL_DIR/test/report.json"
plots=()
[ "$EVAL_PLOTS" = 1 ] || plots=(--no-plots)
evaluate "$EVAL_DIR/test" uncertainty-test.jsonl "${system_args[@]}" "${ood_args[@]}" "${plots[@]}"

if [ "$EVAL_ENS_PRED" = 1 ] && [ -n "$CRITERIA" ]; then
  for i in "${!systems[@]}"; do
    [ "$i" -gt 0 ] || continue  # the ensemble against its own translations says nothing
    stage "5/5 decode test_ens_pred with ${systems[$i]}"
    decode "${systems[$i]}" "${paths[$i]}" "$DISTILL_DATA" test_ens_pred
  done
  stage "5/5 evaluate the students against the ensemble's translations -> $EVAL_DIR/test_ens_pred/report.json"
  evaluate "$EVAL_DIR/test_ens_pred" uncertainty-test_ens_pred.jsonl "${system_args[@]:2}" --no-plots
fi
