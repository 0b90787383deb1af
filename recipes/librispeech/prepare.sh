#!/usr/bin/env bash
# Stage 1: LibriSpeech -> fairseq speech_to_text data: 80-dim log-mel fbank features, TSV manifests, a
# 5000-unit sentencepiece unigram vocabulary (trained on the train* subsets) and config.yaml with
# utterance-level CMVN, as in the paper's ASR setup (fairseq_pdd/data/librispeech.py). Resumable: a
# finished preparation (config.yaml in DATA) is skipped; an interrupted one skips the utterances
# already featurised.
#   LIBRISPEECH=/data/LibriSpeech  OUT=runs/librispeech/data  bash recipes/librispeech/prepare.sh
#   SUBSETS=train-clean-100,dev-clean,test-clean VOCAB_SIZE=5000 CMVN=utterance
# Settings: config.sh (DATA, also given as OUT; SUBSETS defaults to TRAIN_SUBSETS, VALID_SUBSETS,
# TEST_SUBSET and OOD_SUBSETS). Subsets missing from LIBRISPEECH are downloaded from LIBRISPEECH_URL
# (openslr.org, SUBSET.tar.gz) and extracted to LIBRISPEECH/SUBSET.
# The out-of-domain corpora of OOD_CORPORA (another corpus or language in LibriSpeech's layout,
# ROOT/NAME/SPK/CHAPTER/...) are prepared into the same folder afterwards, with the same vocabulary
# (no train* subset named), as split NAME. Subsets added to SUBSETS later (not train*) are prepared
# the same way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${SUBSETS:=$TRAIN_SUBSETS,$VALID_SUBSETS,$TEST_SUBSET${OOD_SUBSETS:+,$OOD_SUBSETS}}"
IFS=, read -r -a subsets <<< "$SUBSETS"
if [ "$NODE_RANK" != 0 ]; then  # multi-node runs: node 0 prepares, the others wait for its data
  mapfile -t ood < <(ood_names)
  for name in "${ood[@]}"; do wait_for "$DATA/$name.tsv"; done
  wait_for "$DATA/config.yaml"
  exit 0
fi
for dir in $OOD_CORPORA; do  # checked before any work
  name=$(basename "$dir")
  if [[ ",$SUBSETS," == *",$name,"* ]]; then
    echo "error: OOD corpus $dir: its name '$name' is a LibriSpeech subset of SUBSETS; rename the folder" >&2
    exit 1
  fi
  if [ "$DRY_RUN" != 1 ] && [ ! -d "$dir" ]; then
    echo "error: OOD corpus $dir (OOD_CORPORA) is not a directory" >&2
    exit 1
  fi
done

# prepare_subsets ROOT SUBSET,...: fairseq_pdd/data/librispeech.py (the vocabulary is trained when a train*
# subset is named, else reused)
prepare_subsets() {
  pdd_script data/librispeech.py --root "$1" --subsets "$2" --out-dir "$DATA" --vocab-size "$VOCAB_SIZE" \
    --num-mel-bins 80 --sample-rate 16000 --cmvn "$CMVN"
}

# fetch_subset SUBSET: LIBRISPEECH/SUBSET from openslr's LibriSpeech/SUBSET archive (extracted aside,
# then moved into place, so an interrupted extraction is never taken for the subset)
fetch_subset() {
  local subset=$1 archive=$LIBRISPEECH/downloads/$1.tar.gz tmp=$LIBRISPEECH/.$1.tmp
  if ! done_already "$archive"; then
    run mkdir -p "$LIBRISPEECH/downloads"
    run curl -fL --retry 3 -o "$archive.tmp" "$LIBRISPEECH_URL/$subset.tar.gz"
    run mv "$archive.tmp" "$archive"
  fi
  run rm -rf "$tmp"
  run mkdir -p "$tmp"
  run tar -xzf "$archive" -C "$tmp" --strip-components 1 "LibriSpeech/$subset"
  run mv "$tmp/$subset" "$LIBRISPEECH/$subset"
  run rm -rf "$tmp"
}

stage "1/4 prepare: LibriSpeech subsets in $LIBRISPEECH (${SUBSETS})"
for subset in "${subsets[@]}"; do
  [ -d "$LIBRISPEECH/$subset" ] || fetch_subset "$subset"
done

stage "1/4 prepare: fbank80, manifests, sentencepiece ($VOCAB_SIZE units), config.yaml -> $DATA"
if ! done_already "$DATA/config.yaml"; then
  prepare_subsets "$LIBRISPEECH" "$SUBSETS"
else
  for subset in "${subsets[@]}"; do  # subsets added since: prepared with the existing vocabulary
    done_already "$DATA/$subset.tsv" && continue
    if [[ $subset == train* ]]; then
      echo "error: $DATA was prepared without the training subset $subset (its vocabulary comes from" \
        "the others): prepare into a new DATA folder" >&2
      exit 1
    fi
    prepare_subsets "$LIBRISPEECH" "$subset"
  done
fi

for dir in $OOD_CORPORA; do
  name=$(basename "$dir")
  stage "1/4 prepare: OOD corpus $dir -> split $name of $DATA (LibriSpeech's vocabulary)"
  done_already "$DATA/$name.tsv" || prepare_subsets "$(dirname "$dir")" "$name"
done
