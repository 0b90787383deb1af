#!/usr/bin/env bash
# Stage 1: WMT17 En-De corpora -> cleaned, sentencepiece-encoded, binarised data (+ OOD test sets).
#
# RAW_DIR layout (plain UTF-8 text, one sentence per line, files of a pair line-aligned); files
# already there are used as they are, missing ones are downloaded (statmt.org; dev/test through
# sacrebleu, newstest2014 is the full 3003-sentence set):
#   $RAW_DIR/europarl-v7.de-en.{en,de}           Europarl v7
#   $RAW_DIR/commoncrawl.de-en.{en,de}           CommonCrawl
#   $RAW_DIR/news-commentary-v12.de-en.{en,de}   News Commentary v12
#   $RAW_DIR/newstest2013.{en,de}                valid
#   $RAW_DIR/newstest2014.{en,de}                test
# (TRAIN_CORPORA / VALID_SET / TEST_SET name other files in the same layout.)
#
# Output: $DATA with train/valid/test and one split per OOD set (perm, dede, OOD_OTHER_SOURCES),
# all binarised with one joined dictionary; $SPM_PREFIX.model; the encoded text in $TEXT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

if [ "$NODE_RANK" != 0 ]; then  # multi-node runs: node 0 prepares, the others wait for its data
  wait_for "$DATA/dict.$TGT.txt"
  exit 0
fi

# --- 1a. raw corpora -------------------------------------------------------------------------------
declare -A URL=(
  [europarl-v7.de-en]=http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
  [commoncrawl.de-en]=http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
  [news-commentary-v12.de-en]=http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz
)
declare -A SACREBLEU_SET=([newstest2013]=wmt13 [newstest2014]=wmt14/full)

fetch_corpus() {  # fetch_corpus NAME: $RAW_DIR/NAME.{SRC,TGT} from its archive
  local name=$1 url=${URL[$1]:-} archive lang member
  if [ -z "$url" ]; then
    echo "error: $RAW_DIR/$name.$SRC or .$TGT is missing and there is no download for '$name'" >&2
    exit 1
  fi
  archive=$RAW_DIR/downloads/$(basename "$url")
  if ! done_already "$archive"; then
    run mkdir -p "$RAW_DIR/downloads"
    run curl -fL --retry 3 -o "$archive.tmp" "$url"
    run mv "$archive.tmp" "$archive"
  fi
  for lang in "$SRC" "$TGT"; do
    done_already "$RAW_DIR/$name.$lang" && continue
    member="*/$name.$lang"
    if [ "$DRY_RUN" != 1 ]; then
      member=$(tar -tzf "$archive" | grep -F "$name.$lang" || true)
      member=${member%%$'\n'*}
      if [ -z "$member" ]; then echo "error: $archive has no file $name.$lang" >&2; exit 1; fi
    fi
    run_to "$RAW_DIR/$name.$lang" tar -xzOf "$archive" --wildcards "$member"
  done
}

fetch_test_set() {  # fetch_test_set NAME: $RAW_DIR/NAME.{SRC,TGT} through sacrebleu
  local name=$1 set=${SACREBLEU_SET[$1]:-}
  if [ -z "$set" ]; then
    echo "error: $RAW_DIR/$name.$SRC or .$TGT is missing and sacrebleu has no set for '$name'" >&2
    exit 1
  fi
  done_already "$RAW_DIR/$name.$SRC" || run_to "$RAW_DIR/$name.$SRC" sacrebleu -t "$set" -l "$SRC-$TGT" --echo src
  done_already "$RAW_DIR/$name.$TGT" || run_to "$RAW_DIR/$name.$TGT" sacrebleu -t "$set" -l "$SRC-$TGT" --echo ref
}

stage "1/5 prepare: raw corpora in $RAW_DIR"
for name in $TRAIN_CORPORA; do
  [ -e "$RAW_DIR/$name.$SRC" ] && [ -e "$RAW_DIR/$name.$TGT" ] || fetch_corpus "$name"
done
for name in "$VALID_SET" "$TEST_SET"; do
  [ -e "$RAW_DIR/$name.$SRC" ] && [ -e "$RAW_DIR/$name.$TGT" ] || fetch_test_set "$name"
done

# --- 1b. training text, OOD sets, sentencepiece ----------------------------------------------------
stage "1/5 prepare: joint training text and OOD sets in $TEXT"
for lang in "$SRC" "$TGT"; do
  files=()
  for name in $TRAIN_CORPORA; do files+=("$RAW_DIR/$name.$lang"); done
  done_already "$TEXT/raw/train.$lang" || run_to "$TEXT/raw/train.$lang" cat "${files[@]}"
  for split in valid test; do
    name=$VALID_SET; [ "$split" = test ] && name=$TEST_SET
    done_already "$TEXT/raw/$split.$lang" || run_to "$TEXT/raw/$split.$lang" cat "$RAW_DIR/$name.$lang"
  done
done
# ood_set NAME ARGS...: evaluation/ood_sets.py ARGS into $TEXT/raw/NAME.{SRC,TGT}, through .tmp names
# (the target, renamed last, marks the set as done)
ood_set() {
  local name=$1 out=$TEXT/raw/$1
  shift
  case $name in train | valid | test | *_ens_pred)
    echo "error: OOD set name '$name' is taken by a data split; choose another" >&2; exit 1 ;;
  esac
  done_already "$out.$TGT" && return 0
  pdd_script evaluation/ood_sets.py "$@" --out-source "$out.$SRC.tmp" --out-target "$out.$TGT.tmp"
  run mv "$out.$SRC.tmp" "$out.$SRC"
  run mv "$out.$TGT.tmp" "$out.$TGT"
}
for name in $OOD_SETS; do
  case $name in
    perm) ood_set perm permute --source "$TEXT/raw/test.$SRC" --target "$TEXT/raw/test.$TGT" --seed "$PERM_SEED" ;;
    dede) ood_set dede swap --other-source "$TEXT/raw/test.$TGT" --target "$TEXT/raw/test.$TGT" ;;
    *) echo "error: unknown OOD set '$name' in OOD_SETS (perm, dede; others through OOD_OTHER_SOURCES)" >&2
       exit 1 ;;
  esac
done
for item in $OOD_OTHER_SOURCES; do
  name=${item%%=*} file=${item#*=}
  if [ "$name" = "$item" ] || [ -z "$name" ] || [ -z "$file" ]; then
    echo "error: OOD_OTHER_SOURCES expects NAME=FILE items, got '$item'" >&2
    exit 1
  fi
  ood_set "$name" swap --other-source "$file" --target "$TEXT/raw/test.$TGT" --truncate
done

stage "1/5 prepare: joint sentencepiece model ($BPE_SIZE $SPM_MODEL_TYPE units) -> $SPM_MODEL"
# shellcheck disable=SC2086
done_already "$SPM_MODEL" || pdd_script data/mt_text.py spm-train \
  --input "$TEXT/raw/train.$SRC" "$TEXT/raw/train.$TGT" --model-prefix "$SPM_PREFIX" --vocab-size "$BPE_SIZE" \
  --model-type "$SPM_MODEL_TYPE" --input-sentence-size "$SPM_INPUT_SENTENCES" --threads "$THREADS" $SPM_EXTRA

splits=(train valid test)
mapfile -t ood < <(ood_names)
splits+=("${ood[@]}")
inputs=() outputs=()
for split in "${splits[@]}"; do
  for lang in "$SRC" "$TGT"; do
    [ "$split" = train ] && done_already "$TEXT/clean/train.$lang" && continue
    done_already "$TEXT/spm/$split.$lang" && continue
    inputs+=("$TEXT/raw/$split.$lang") outputs+=("$TEXT/spm/$split.$lang")
  done
done
if [ "${#inputs[@]}" -gt 0 ]; then
  pdd_script data/mt_text.py encode --model "$SPM_MODEL" --threads "$THREADS" \
    --input "${inputs[@]}" --output "${outputs[@]}"
fi
done_already "$TEXT/clean/train.$TGT" || pdd_script data/mt_text.py clean \
  --source "$TEXT/spm/train.$SRC" --target "$TEXT/spm/train.$TGT" \
  --out-source "$TEXT/clean/train.$SRC" --out-target "$TEXT/clean/train.$TGT" \
  --min-len "$CLEAN_MIN_LEN" --max-len "$CLEAN_MAX_LEN" --ratio "$CLEAN_RATIO"

# --- 1c. binarise ----------------------------------------------------------------------------------
stage "1/5 prepare: fairseq-preprocess --joined-dictionary -> $DATA (test splits: test ${ood[*]})"
if ! done_already "$DATA/dict.$TGT.txt"; then
  testpref=$TEXT/spm/test
  for split in "${ood[@]}"; do testpref+=",$TEXT/spm/$split"; done
  run rm -rf "$DATA.tmp"
  run fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
    --trainpref "$TEXT/clean/train" --validpref "$TEXT/spm/valid" --testpref "$testpref" \
    --destdir "$DATA.tmp" --workers "$THREADS"
  # fairseq names the extra test sets test1, test2, ...: give them their OOD names
  for i in "${!ood[@]}"; do rename_split "$DATA.tmp" "test$((i + 1))" "${ood[$i]}"; done
  run mv "$DATA.tmp" "$DATA"   # the folder appears complete or not at all
fi
