# WMT17 En-De recipe settings, sourced by every stage script. Every value is an environment variable
# with a default; set it before running a stage (e.g. `WORK=/scratch/wmt M=5 bash run.sh`).
# Defaults are the paper's set-up; see the "WMT17 En-De recipe" section of the README.
# shellcheck shell=bash
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib.sh
source "$RECIPE_DIR/../lib.sh"

# --- paths -----------------------------------------------------------------------------------------
: "${WORK:=runs/wmt17_en_de}"            # everything the recipe writes goes below WORK
: "${RAW_DIR:=$WORK/raw}"                # raw corpora (layout in 1_prepare.sh); downloaded if missing
: "${TEXT:=$WORK/text}"                  # concatenated, OOD and sentencepiece-encoded text
: "${SPM_PREFIX:=$WORK/spm/spm}"         # the joint sentencepiece model: $SPM_PREFIX.model
: "${DATA:=$WORK/data-bin}"              # teachers' data (fairseq-preprocess --joined-dictionary)
: "${DISTILL_DATA:=$WORK/data-bin-distill}"  # students' data: train = the ensemble's translations
: "${TEACHERS_DIR:=$WORK/teachers}" "${STUDENTS_DIR:=$WORK/students}"
: "${DECODE_DIR:=$WORK/decode}" "${EVAL_DIR:=$WORK/eval}"
: "${THREADS:=$(nproc 2>/dev/null || echo 1)}"   # CPU workers of sentencepiece / fairseq-preprocess

# --- data ------------------------------------------------------------------------------------------
: "${SRC:=en}" "${TGT:=de}"
: "${TRAIN_CORPORA:=europarl-v7.de-en commoncrawl.de-en news-commentary-v12.de-en}"
: "${VALID_SET:=newstest2013}" "${TEST_SET:=newstest2014}"
: "${BPE_SIZE:=40000}"                   # joint sentencepiece units (the paper's 40,000 classes)
: "${SPM_MODEL_TYPE:=bpe}" "${SPM_INPUT_SENTENCES:=10000000}" "${SPM_EXTRA:=}"
: "${CLEAN_MIN_LEN:=1}" "${CLEAN_MAX_LEN:=250}" "${CLEAN_RATIO:=1.5}"   # on subword pieces, train only
# OOD test sets built from the test set: perm (source words shuffled, seed PERM_SEED) and dede (the
# German reference as the source). OOD_OTHER_SOURCES adds "NAME=FILE ..." sets whose sources are the
# lines of FILE (a text in another language; cut to the test set's length).
: "${OOD_SETS:=perm dede}" "${OOD_OTHER_SOURCES:=}" "${PERM_SEED:=0}"

# --- models ----------------------------------------------------------------------------------------
: "${M:=3}"                              # teachers
: "${SEEDS:=$(seq -s ' ' 1 "$M")}"       # one per teacher
: "${ARCH:=transformer_wmt_en_de_big}"
: "${MODEL_ARGS:=--arch $ARCH --share-decoder-input-output-embed}"   # tests shrink the model here
: "${FP16:=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}"
: "${EXTRA:=}" "${TEACHER_EXTRA:=}" "${STUDENT_EXTRA:=}" "${GEN_EXTRA:=}"   # appended to the commands

# optimiser, shared by teachers and students (the authors' README)
: "${ADAM_BETAS:=(0.9, 0.98)}" "${LR:=5e-4}" "${WARMUP:=4000}" "${WEIGHT_DECAY:=1e-4}"
# Batches (recipes/lib.sh, derive_update_freq). The paper's students ran --max-tokens 1024
# --update-freq 32: 32768 target tokens per GPU and update. 1024 per pass was the authors' memory
# limit (their loss held B x T x M x V float64 tensors); this plugin's loss does not grow with M, and
# at 1024 tokens a step leaves the GPU idle between small kernels (PD-EnD2 with 3 teachers ran 6.3x
# the tokens/s at 8192 tokens per step as at 1024, 13 GB, on one H200), so the default pass is 8192
# tokens and UPDATE_FREQ = TOKENS_PER_UPDATE / MAX_TOKENS = 4 keeps the paper's update. Convention:
# TOKENS_PER_UPDATE is per GPU, as in the authors' command lines (their GPU count is not recorded), so
# W = NGPU x NNODES workers see W x 32768 tokens per update; to keep 32768 in all, set
# TOKENS_PER_UPDATE=$((32768 / W)) (e.g. 4096 on 8 GPUs, with MAX_TOKENS=4096: update freq 1).
# Setting UPDATE_FREQ overrides the quotient. Teachers: 8192 x 4 as well (32k tokens per update).
# teachers: the authors' README (label-smoothed CE); the number of updates is not given there
: "${TEACHER_DROPOUT:=0.1}" "${TEACHER_CLIP_NORM:=0.0}" "${LABEL_SMOOTHING:=0.1}"
: "${TEACHER_MAX_TOKENS:=8192}" "${TEACHER_TOKENS_PER_UPDATE:=32768}" "${TEACHER_MAX_UPDATE:=300000}"
# students: the paper's hyper-parameters (dropout 0.2, clip 10, 32k tokens per update, 20k updates, seed 0)
: "${DROPOUT:=0.2}" "${CLIP_NORM:=10.0}" "${MAX_TOKENS:=8192}" "${TOKENS_PER_UPDATE:=32768}" "${MAX_UPDATE:=20000}"
: "${SEED:=0}" "${KEEP_LAST_EPOCHS:=10}" "${STUDENT_VALID_SUBSETS:=valid,test,valid_ens_pred}"
# CRITERIA, TARGET_CONCENTRATION, PD_MODEL_OFFSET, MODEL_OFFSET, TARGET_OFFSET, ANNEAL_CRITERIA, INIT_TEMP, ANNEAL_START,
# ANNEAL_END, FINETUNE_FROM_KD: defaults in ../lib.sh

# --- decoding --------------------------------------------------------------------------------------
: "${GEN_MAX_TOKENS:=2048}"
: "${MAX_LEN_A=1.2}" "${MAX_LEN_B=10}"             # hypotheses of at most 1.2 x source + 10 pieces (../lib.sh)
: "${DISTILL_BEAM:=5}" "${DISTILL_NBEST:=1}"       # the ensemble's translations of the training set
: "${BEAM:=5}" "${NBEST:=5}"                       # evaluation decoding
: "${EVAL_NBEST:=1}" "${EVAL_WEIGHTING:=bs}" "${EVAL_PLOTS:=1}" "${EVAL_ENS_PRED:=1}"

EVAL_TASK=mt  # fairseq-pdd-evaluate --task
recipe_arrays
derive_update_freq TEACHER_
derive_update_freq ""
SPM_MODEL=$SPM_PREFIX.model

# optimiser options of every fairseq-train run: clip norm and dropout differ between teachers and students
optim_args() {
  printf '%s\n' --optimizer adam --adam-betas "$ADAM_BETAS" --clip-norm "$1" --lr "$LR" \
    --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --dropout "$2" --weight-decay "$WEIGHT_DECAY"
}

# OOD split names (binarised next to test in DATA)
ood_names() {
  local name
  for name in $OOD_SETS; do echo "$name"; done
  for name in $OOD_OTHER_SOURCES; do echo "${name%%=*}"; done
}

# rename_split DIR FROM TO: rename a binarised split of DIR (both languages, .bin and .idx)
rename_split() {
  local lang ext
  for lang in "$SRC" "$TGT"; do
    for ext in bin idx; do
      run mv "$1/$2.$SRC-$TGT.$lang.$ext" "$1/$3.$SRC-$TGT.$lang.$ext"
    done
  done
}
