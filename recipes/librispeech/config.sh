# LibriSpeech recipe settings, sourced by every stage script. Every value is an environment variable
# with a default; set it before running a stage (e.g. `WORK=/scratch/ls M=5 bash run.sh`).
# Defaults are the paper's set-up; see the "LibriSpeech recipe (paper scale)" section of the README.
# shellcheck shell=bash
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib.sh
source "$RECIPE_DIR/../lib.sh"

# --- paths -----------------------------------------------------------------------------------------
: "${WORK:=runs/librispeech}"            # everything the recipe writes goes below WORK
: "${LIBRISPEECH:=$WORK/LibriSpeech}"    # corpus root: LIBRISPEECH/<subset>/...; missing subsets downloaded
: "${DATA:=${OUT:-$WORK/data}}"          # fbank80 + TSV + sentencepiece + config.yaml (OUT: prepare.sh's old name)
: "${TEACHERS_DIR:=$WORK/teachers}" "${STUDENTS_DIR:=$WORK/students}"
: "${DECODE_DIR:=$WORK/decode}" "${EVAL_DIR:=$WORK/eval}"

# --- data ------------------------------------------------------------------------------------------
: "${TRAIN_SUBSETS:=train-clean-100,train-clean-360,train-other-500}"   # 960 h, concatenated
: "${VALID_SUBSETS:=dev-clean,dev-other}"   # validated each epoch; the first one picks checkpoint_best
: "${TEST_SUBSET:=test-clean}"              # in-domain test set
: "${OOD_SUBSETS:=test-other}"              # LibriSpeech subsets evaluated as OOD against TEST_SUBSET
# other corpora or languages (the paper's AMI, Common Voice French) converted to LibriSpeech's layout
# (16 kHz FLAC + SPK-CHAPTER.trans.txt): "DIR ..." where DIR = ROOT/NAME holds the speaker folders;
# each is prepared into DATA as split NAME with the LibriSpeech vocabulary and evaluated as OOD
: "${OOD_CORPORA:=}"
: "${VOCAB_SIZE:=5000}" "${CMVN:=utterance}"
: "${LIBRISPEECH_URL:=https://www.openslr.org/resources/12}"   # SUBSET.tar.gz, for missing subsets

# --- models ----------------------------------------------------------------------------------------
: "${M:=3}"                              # teachers
: "${SEEDS:=$(seq -s ' ' 1 "$M")}"       # one per teacher
: "${ARCH:=pdd_vggtransformer_2}"        # fairseq's vggtransformer_2 (the authors' ASR model)
: "${MODEL_ARGS:=--arch $ARCH}"          # tests shrink the model here
: "${FP16:=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}"
: "${EXTRA:=}" "${TEACHER_EXTRA:=}" "${STUDENT_EXTRA:=}" "${GEN_EXTRA:=}"   # appended to the commands
: "${NUM_WORKERS:=4}"                    # data loader processes per GPU (the features are .npy files)

# Batches (recipes/lib.sh, derive_update_freq), counted in feature frames (100 a second): the same
# convention as the WMT17 recipe. TOKENS_PER_UPDATE is what one GPU contributes to an update, the
# max tokens x update freq of the command lines (students 8000 x 1, teachers 5000 x 1); UPDATE_FREQ
# = TOKENS_PER_UPDATE / MAX_TOKENS unless set, so a smaller MAX_TOKENS (a smaller GPU, e.g. 4000)
# keeps the update (update freq 2). The per-pass batch is not raised as in the WMT17 recipe: the
# update freq is already 1, so a larger pass would change the paper's update size, and 8000 frames
# were no loss-memory limit (about 230 target pieces per batch at 1e7 pieces per 3.5e8 frames of
# train-960: the authors' B x T x M x V at M = 3, V = 5000 is ~28 MB in float64), while the encoder
# already runs 2000 positions per pass after the 4x subsampling. W = NGPU x NNODES workers see
# W x TOKENS_PER_UPDATE frames per update.
# teachers: fairseq's vggtransformer_2 LibriSpeech recipe (examples/speech_recognition): adadelta
# lr 1.0 (eps 1e-8, rho 0.95), clip 10, 5000 frames per batch, 80 epochs, cross-entropy
# (LABEL_SMOOTHING > 0: label-smoothed cross-entropy instead)
: "${TEACHER_LR:=1.0}" "${TEACHER_CLIP_NORM:=10.0}" "${TEACHER_MAX_TOKENS:=5000}" "${TEACHER_MAX_EPOCH:=80}"
: "${TEACHER_TOKENS_PER_UPDATE:=5000}"
: "${LABEL_SMOOTHING:=0}" "${ADADELTA_EPS:=1e-8}" "${ADADELTA_RHO:=0.95}"
# students (the authors' ASR settings): PD-EnD2 and the other Dirichlet criteria with adam lr 1e-4,
# weight decay 1e-8, clip 1, inverse_sqrt with 4k warm-up, 8000 frames per batch, 80 epochs; the
# criteria of ADADELTA_CRITERIA (the KD baseline) with adadelta lr KD_LR=0.1 and the same clip,
# weight decay, batch and epochs (adadelta's eps and rho as for the teachers)
: "${LR:=1e-4}" "${WEIGHT_DECAY:=1e-8}" "${CLIP_NORM:=1.0}" "${WARMUP:=4000}"
: "${MAX_TOKENS:=8000}" "${TOKENS_PER_UPDATE:=8000}" "${MAX_EPOCH:=80}" "${SEED:=0}"
: "${KEEP_LAST_EPOCHS:=10}"   # epoch checkpoints kept, teachers and students (~3-4 GB each for vggtransformer_2)
: "${ADADELTA_CRITERIA:=forward_kl_mean_distillation}" "${KD_LR:=0.1}"
# CRITERIA, TARGET_CONCENTRATION, PD_MODEL_OFFSET, MODEL_OFFSET, TARGET_OFFSET, ANNEAL_CRITERIA, INIT_TEMP, ANNEAL_START,
# ANNEAL_END, FINETUNE_FROM_KD: defaults in ../lib.sh

# --- decoding --------------------------------------------------------------------------------------
: "${GEN_MAX_TOKENS:=25000}"             # frames per decoding batch
: "${BEAM:=20}" "${NBEST:=20}"           # the paper's ASR decoding
: "${EVAL_NBEST:=1}" "${EVAL_WEIGHTING:=bs}" "${EVAL_PLOTS:=1}"

EVAL_TASK=asr  # fairseq-pdd-evaluate --task
recipe_arrays
derive_update_freq TEACHER_
derive_update_freq ""

# the data options of every fairseq-train run
data_args=(--config-yaml config.yaml --train-subset "$TRAIN_SUBSETS" --valid-subset "$VALID_SUBSETS"
  --num-workers "$NUM_WORKERS")

# adadelta_args LR: fairseq's adadelta with ADADELTA_EPS / ADADELTA_RHO
adadelta_args() {
  printf '%s\n' --optimizer adadelta --lr "$1" --adadelta-eps "$ADADELTA_EPS" --adadelta-rho "$ADADELTA_RHO"
}

# student_optim_args CRITERION: the optimiser of the student trained with CRITERION (and with FP16=1
# --memory-efficient-fp16 for adam; fairseq's adadelta does not support it)
student_optim_args() {
  if [[ " $ADADELTA_CRITERIA " == *" $1 "* ]]; then adadelta_args "$KD_LR"
  else
    printf '%s\n' --optimizer adam --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" \
      "${memory_efficient_fp16[@]}"
  fi
  printf '%s\n' --clip-norm "$CLIP_NORM" --weight-decay "$WEIGHT_DECAY"
}

# ood_names: the OOD split names in DATA (OOD_SUBSETS, then the NAME of each OOD_CORPORA folder)
ood_names() {
  local name
  for name in ${OOD_SUBSETS//,/ } $OOD_CORPORA; do basename "$name"; done
}
