#!/usr/bin/env bash
# Stage 4: decode TEST_SUBSET (test-clean) and the OOD sets (OOD_SUBSETS, test-other; OOD_CORPORA)
# with the ensemble and each student (fairseq-pdd-generate --task speech_to_text: beam BEAM, n-best
# NBEST, the paper's 20 / 20, sentencepiece removed through config.yaml, WER, uncertainty of every
# hypothesis and of the forced references), then fairseq-pdd-evaluate --task asr: WER (also of each
# OOD set), PRR against sentence WER, token error detection, OOD ROC-AUC / PR-AUC per measure,
# plots -> $EVAL_DIR/$TEST_SUBSET/report.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

[ "$NODE_RANK" = 0 ] || exit 0  # decoding runs on one node

mapfile -t ood < <(ood_names)
decode_systems 4/4 "$DATA" "$TEST_SUBSET" "${ood[@]}" -- --task speech_to_text --config-yaml config.yaml --scoring wer

stage "4/4 evaluate: WER, OOD detection, error detection -> $EVAL_DIR/$TEST_SUBSET/report.json"
evaluate_systems "$EVAL_DIR/$TEST_SUBSET" "$TEST_SUBSET" "${ood[@]}"
