#!/usr/bin/env bash
# LibriSpeech -> fairseq speech_to_text data: 80-dim log-mel fbank features, TSV manifests, a
# 5000-unit sentencepiece unigram vocabulary (trained on the train* subsets) and config.yaml with
# utterance-level CMVN, as in the paper's ASR setup. Re-running resumes (utterances already
# featurised are skipped). Needs the extracted corpus (LibriSpeech/<subset>/<spk>/<chapter>/*.flac).
#   LIBRISPEECH=/data/LibriSpeech  OUT=runs/librispeech/data  bash recipes/librispeech/prepare.sh
#   SUBSETS=train-clean-100,dev-clean,test-clean VOCAB_SIZE=5000 CMVN=utterance  (defaults below)
# The out-of-domain sets of the paper's ASR experiments (another corpus or language) are prepared into
# the same folder afterwards, with the same vocabulary, by naming no train* subset:
#   python -m fairseq_pdd.librispeech --root OTHER_ROOT --subsets SUBSET --out-dir "$OUT"
set -euo pipefail
LIBRISPEECH=${LIBRISPEECH:?set LIBRISPEECH to the corpus root that holds the subset folders}
OUT=${OUT:-runs/librispeech/data}
SUBSETS=${SUBSETS:-train-clean-100,train-clean-360,train-other-500,dev-clean,dev-other,test-clean,test-other}
VOCAB_SIZE=${VOCAB_SIZE:-5000}
CMVN=${CMVN:-utterance}
python -m fairseq_pdd.librispeech --root "$LIBRISPEECH" --subsets "$SUBSETS" --out-dir "$OUT" \
  --vocab-size "$VOCAB_SIZE" --num-mel-bins 80 --sample-rate 16000 --cmvn "$CMVN"
