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
mt_decode=(--bpe sentencepiece --sentencepiece-model "$SPM_MODEL" --scoring sacrebleu)
decode_systems 5/5 "$DATA" test "${ood[@]}" -- "${mt_decode[@]}"

stage "5/5 evaluate: BLEU, OOD detection, error detection, calibration -> $EVAL_DIR/test/report.json"
evaluate_systems "$EVAL_DIR/test" test "${ood[@]}"

if [ "$EVAL_ENS_PRED" = 1 ] && [ -n "$CRITERIA" ]; then
  for i in "${!systems[@]}"; do
    [ "$i" -gt 0 ] || continue  # the ensemble against its own translations says nothing
    stage "5/5 decode test_ens_pred with ${systems[$i]}"
    decode "${systems[$i]}" "${paths[$i]}" "$DISTILL_DATA" test_ens_pred "${mt_decode[@]}"
  done
  stage "5/5 evaluate the students against the ensemble's translations -> $EVAL_DIR/test_ens_pred/report.json"
  evaluate "$EVAL_DIR/test_ens_pred" uncertainty-test_ens_pred.jsonl "${system_args[@]:2}" --no-plots
fi
