# Shared by the recipe stage scripts (sourced, not run): printing, DRY_RUN, resumable steps and the
# launch of fairseq-train on one or many GPUs / nodes through fairseq's own torch.distributed.
#
# Environment (all optional):
#   DRY_RUN=1        print every command line, run none
#   DEVICE=cuda|cpu  cpu: training runs on CPU (gloo); for tests and smoke runs
#   NGPU=1           processes per node (GPUs per node; CPU processes with DEVICE=cpu)
#   NNODES=1         nodes; NODE_RANK=0 this node's index; MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
#   LAUNCHER=fairseq|torchrun|slurm
#                    fairseq (default): one fairseq-train per node, which spawns NGPU workers with
#                      ranks NODE_RANK*NGPU + i (tcp:// rendez-vous at MASTER_ADDR:MASTER_PORT);
#                    torchrun: torchrun starts the NGPU workers, fairseq reads its env:// variables;
#                    slurm: run under srun with one task per node; fairseq reads SLURM_* itself.

: "${DRY_RUN:=0}" "${DEVICE:=cuda}" "${NGPU:=1}" "${NNODES:=1}" "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${LAUNCHER:=fairseq}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -z "${USER_DIR:-}" ]; then
  USER_DIR=$(fairseq-pdd-user-dir) || {
    echo "error: fairseq-pdd-user-dir failed: install fairseq_pdd or set USER_DIR to its folder" >&2
    exit 1
  }
fi

stage() { echo "==> [$(date +%H:%M:%S)] $*" >&2; }

# run CMD...: print the command line (shell-quoted), then run it unless DRY_RUN=1.
run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  [ "$DRY_RUN" = 1 ] || "$@"
}

# run_to FILE CMD...: like run, with CMD's stdout going to FILE.tmp, renamed to FILE only when CMD
# succeeds (a half-written FILE is never mistaken for a finished one by done_already).
run_to() {
  local out=$1 status=0
  shift
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf ' > %q\n' "$out" >&2
  [ "$DRY_RUN" != 1 ] || return 0
  mkdir -p "$(dirname "$out")"
  "$@" > "$out.tmp" || status=$?
  if [ "$status" -ne 0 ]; then rm -f "$out.tmp"; return "$status"; fi
  mv "$out.tmp" "$out"
}

# wait_for PATH...: block until every PATH exists (another node writes them to a shared file
# system), polling every POLL_S seconds (default 60). No-op with DRY_RUN=1.
wait_for() {
  [ "$DRY_RUN" != 1 ] || return 0
  local p
  for p in "$@"; do
    until [ -e "$p" ]; do
      echo "    (node $NODE_RANK waiting for $p)" >&2
      sleep "${POLL_S:-60}"
    done
  done
}

# done_already FILE: true (and says so) when FILE exists, so a finished step is skipped on re-runs.
done_already() {
  if [ "$DRY_RUN" != 1 ] && [ -e "$1" ]; then
    echo "    (done: $1)" >&2
    return 0
  fi
  return 1
}

# train ARGS...: fairseq-train ARGS on NGPU x NNODES workers (--user-dir is always passed).
train() {
  local world=$((NGPU * NNODES))
  local args=("$@" --user-dir "$USER_DIR")
  if [ "$DEVICE" = cpu ]; then
    args+=(--cpu)
    if [ "$world" -gt 1 ]; then
      # fairseq's own spawn needs GPUs, and its pytorch_ddp wrapper pins a CUDA device: on CPU each
      # rank is its own process (--distributed-no-spawn), gloo, fairseq's legacy_ddp gradient sync.
      local pids=() i status=0
      for ((i = 0; i < NGPU; i++)); do
        run fairseq-train "${args[@]}" --distributed-backend gloo --ddp-backend legacy_ddp \
          --distributed-world-size "$world" --distributed-rank $((NODE_RANK * NGPU + i)) \
          --distributed-init-method "tcp://$MASTER_ADDR:$MASTER_PORT" --distributed-no-spawn &
        pids+=($!)
      done
      for i in "${pids[@]}"; do wait "$i" || status=$?; done
      return "$status"
    fi
    run fairseq-train "${args[@]}"
    return
  fi
  if [ "$world" -eq 1 ]; then
    run fairseq-train "${args[@]}"
  elif [ "$LAUNCHER" = torchrun ]; then
    run torchrun --nnodes "$NNODES" --nproc_per_node "$NGPU" --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$(command -v fairseq-train)" \
      "${args[@]}" --distributed-world-size "$world"
  elif [ "$LAUNCHER" = slurm ]; then
    run fairseq-train "${args[@]}" --distributed-world-size "$world" --distributed-port "$MASTER_PORT"
  else
    run fairseq-train "${args[@]}" --distributed-world-size "$world" \
      --distributed-init-method "tcp://$MASTER_ADDR:$MASTER_PORT" --distributed-rank $((NODE_RANK * NGPU))
  fi
}

# ensemble_paths DIR1 DIR2 ...: the colon-separated checkpoint_best.pt (or _last) of each save dir.
ensemble_paths() {
  local out=() d
  for d in "$@"; do
    if [ -e "$d/checkpoint_best.pt" ] || [ "$DRY_RUN" = 1 ]; then out+=("$d/checkpoint_best.pt")
    else out+=("$d/checkpoint_last.pt"); fi
  done
  (IFS=:; echo "${out[*]}")
}

# --- shared by the paper-scale recipes (wmt17_en_de, librispeech) ----------------------------------
# Defaults of the students' criteria, the same in every recipe (a config.sh may set them first).
: "${CRITERIA:=rkl_dirichlet_proxy_distillation forward_kl_mean_distillation}"
# MODEL_OFFSET: the Dirichlet offset of EnD2 and the forward KL to the proxy; PD_MODEL_OFFSET that of PD-EnD2
# (0, the criterion's default: with 1 its students wrote repetition loops at K = 3352, docs/errors.md).
: "${TARGET_CONCENTRATION:=mkl}" "${MODEL_OFFSET:=1}" "${PD_MODEL_OFFSET:=0}" "${TARGET_OFFSET:=1}"
# EnD2's NLL and the forward KL to the proxy collapse to a flat Dirichlet when trained from scratch
# as they are: the criteria of FINETUNE_FROM_KD start from the KD student (listed before them in
# CRITERIA); those of ANNEAL_CRITERIA train with the temperature of the teachers and the student
# (--temper-student) annealed from INIT_TEMP to 1 between updates ANNEAL_START and ANNEAL_END (a
# criterion may be in both). Options that help them from scratch (docs/criteria.md, "Training EnD2
# and the forward KL to the proxy from scratch"): MAX_TARGET_PRECISION, the forward KL's cap on the
# proxy precision (--max-target-precision; empty: none), DIVIDE_BY_PRECISION=1, EnD2's loss per token
# over the student's precision (--divide-by-precision), TEACHER_SMOOTHING, EnD2's teachers smoothed
# towards uniform (--teacher-smoothing; empty: none). They train both from scratch on the demo task
# (recipes/toy does so), but both collapse with them on a toy task with K = 3352, and from the KD
# student too (docs/errors.md); the paper-scale recipes keep the warm start as their default.
: "${FINETUNE_FROM_KD=dirichlet_proxy_distillation sequence_distribution_distillation}"  # empty: no warm start
: "${ANNEAL_CRITERIA=}" "${INIT_TEMP:=10}" "${ANNEAL_START:=0}" "${ANNEAL_END:=4000}"
: "${MAX_TARGET_PRECISION=}" "${DIVIDE_BY_PRECISION=0}" "${TEACHER_SMOOTHING=}"
: "${PYTHON:=python}"

# derive_update_freq PREFIX: the batch settings of one kind of training run, PREFIX "" (students) or
# TEACHER_ (teachers). ${PREFIX}MAX_TOKENS is the batch of one forward/backward pass on one GPU,
# ${PREFIX}TOKENS_PER_UPDATE the tokens one GPU contributes to an update (max tokens x update freq of
# the paper's command lines); unless ${PREFIX}UPDATE_FREQ is set, it becomes their quotient, which
# must be a whole number. With W = NGPU x NNODES workers an update sees W x TOKENS_PER_UPDATE tokens.
derive_update_freq() {
  local max_name=${1}MAX_TOKENS per_name=${1}TOKENS_PER_UPDATE freq_name=${1}UPDATE_FREQ name
  for name in "$max_name" "$per_name" "$freq_name"; do
    if [ "$name" = "$freq_name" ] && [ -z "${!name:-}" ]; then continue; fi
    if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
      echo "error: $name='${!name}' is not a positive whole number" >&2
      exit 1
    fi
  done
  [ -z "${!freq_name:-}" ] || return 0
  if (( ${!per_name} % ${!max_name} != 0 )); then
    echo "error: $max_name=${!max_name} does not divide $per_name=${!per_name} (tokens per GPU and" \
      "update): choose a $max_name that divides it, or set $freq_name yourself" >&2
    exit 1
  fi
  printf -v "$freq_name" '%d' $((${!per_name} / ${!max_name}))
}

# update_size PREFIX [UNIT]: "MAX x FREQ per GPU x W workers = N UNIT per update" (UNIT: tokens) of
# derive_update_freq's settings
update_size() {
  local max_name=${1}MAX_TOKENS freq_name=${1}UPDATE_FREQ world=$((NGPU * NNODES))
  echo "${!max_name} x ${!freq_name} per GPU x $world workers = $((${!max_name} * ${!freq_name} * world))" \
    "${2:-tokens} per update"
}

# recipe_arrays: the word lists of a config's string settings, and the device options, as arrays:
# model_args (MODEL_ARGS), extra (EXTRA), gen_extra (GEN_EXTRA), seeds (SEEDS, one per teacher, M of
# them); with FP16=1 teacher_device_args (--fp16), student_device_args (also the teachers in fp16),
# memory_efficient_fp16 (for the optimisers that support it, e.g. adam, not adadelta) and gen_args
# (--fp16); gen_args always has what every decoding needs, and the length cap MAX_LEN_A / MAX_LEN_B.
recipe_arrays() {
  # shellcheck disable=SC2206
  model_args=($MODEL_ARGS) extra=($EXTRA) gen_extra=($GEN_EXTRA)
  read -r -a seeds <<< "$SEEDS"
  if [ "${#seeds[@]}" -ne "$M" ]; then
    echo "error: SEEDS has ${#seeds[@]} seeds ($SEEDS) but M=$M teachers" >&2
    exit 1
  fi
  teacher_device_args=() student_device_args=() memory_efficient_fp16=() gen_args=()
  if [ "$FP16" = 1 ]; then
    teacher_device_args=(--fp16)
    student_device_args=(--fp16 --fp16-ensemble)
    memory_efficient_fp16=(--memory-efficient-fp16)
    gen_args=(--fp16)
  fi
  [ "$DEVICE" != cpu ] || gen_args+=(--cpu)
  # Length cap: at most MAX_LEN_A x source length + MAX_LEN_B tokens (fairseq-generate's --max-len-a /
  # --max-len-b; unset or empty: fairseq's own, 200 tokens; the MT recipes set 1.2 and 10). A model
  # caught in a repetition loop otherwise writes 200 tokens: on a toy task with K = 3352, 15 looping
  # sentences of 1000 made the PD-EnD2 student's output 1.15x the ensemble's and cost it 9.7 BLEU
  # (docs/errors.md, "The PD-EnD2 student's gap on real data").
  [ -z "${MAX_LEN_A:-}" ] || gen_args+=(--max-len-a "$MAX_LEN_A")
  [ -z "${MAX_LEN_B:-}" ] || gen_args+=(--max-len-b "$MAX_LEN_B")
  # fairseq's batching drops the last batch of a split when its size is not a multiple of
  # --required-batch-size-multiple (default 8; fairseq issue #5036): decoding must see every sentence
  gen_args+=(--required-batch-size-multiple 1)
}

# pdd_script FILE ARGS...: a fairseq-free tool of the plugin (data/mt_text.py, data/librispeech.py,
# evaluation/ood_sets.py) run as a script, the same as `python -m fairseq_pdd.<module>` minus the
# package's import of fairseq (~4 s per call); PYTHONSAFEPATH keeps the plugin folder off sys.path.
pdd_script() {
  local file=$1
  shift
  run env PYTHONSAFEPATH=1 "$PYTHON" "$USER_DIR/$file" "$@"
}

# teacher_dirs: the save directories of the M teachers ($TEACHERS_DIR/teacher1..M)
teacher_dirs() {
  local i
  for ((i = 1; i <= M; i++)); do echo "$TEACHERS_DIR/teacher$i"; done
}

# ensemble: the colon-separated checkpoints of the teacher ensemble
ensemble() {
  local dirs
  mapfile -t dirs < <(teacher_dirs)
  ensemble_paths "${dirs[@]}"
}

# train_model SAVE ARGS...: `train ARGS --save-dir SAVE ...` unless SAVE holds the marker file `done`;
# an interrupted run resumes from SAVE/checkpoint_last.pt (fairseq's own restore).
train_model() {
  local save=$1
  shift
  done_already "$save/done" && return 0
  run mkdir -p "$save"
  train "$@" --save-dir "$save" --log-file "$save/train.log" --log-format simple
  run touch "$save/done"
}

# train_teachers LABEL ARGS...: the M teachers, teacher i with seed i of SEEDS into $TEACHERS_DIR/teacher<i>
train_teachers() {
  local label=$1 saves i
  shift
  mapfile -t saves < <(teacher_dirs)
  for i in "${!saves[@]}"; do
    stage "$label teacher $((i + 1))/$M (seed ${seeds[$i]}) -> ${saves[$i]}"
    train_model "${saves[$i]}" "$@" --seed "${seeds[$i]}"
  done
}

# criterion_options CRITERION: sets crit=(--criterion CRITERION and its own options); an unknown
# criterion stops the stage.
criterion_options() {
  crit=(--criterion "$1")
  case $1 in
    forward_kl_mean_distillation) ;;
    sequence_distribution_distillation)
      crit+=(--model-offset "$MODEL_OFFSET")
      [ "$DIVIDE_BY_PRECISION" != 1 ] || crit+=(--divide-by-precision)
      [ -z "$TEACHER_SMOOTHING" ] || crit+=(--teacher-smoothing "$TEACHER_SMOOTHING") ;;
    rkl_dirichlet_proxy_distillation)
      crit+=(--target-concentration "$TARGET_CONCENTRATION" --model-offset "$PD_MODEL_OFFSET" --target-offset "$TARGET_OFFSET") ;;
    dirichlet_proxy_distillation)
      crit+=(--target-concentration "$TARGET_CONCENTRATION" --model-offset "$MODEL_OFFSET" --target-offset "$TARGET_OFFSET")
      [ -z "$MAX_TARGET_PRECISION" ] || crit+=(--max-target-precision "$MAX_TARGET_PRECISION") ;;
    *) echo "error: unknown criterion '$1' in CRITERIA" >&2; exit 1 ;;
  esac
}

# check_criteria: every name in CRITERIA is known (a typo stops the stage before any training)
check_criteria() {
  local criterion
  for criterion in $CRITERIA; do criterion_options "$criterion"; done
}

# init_options CRITERION: how the student of CRITERION starts: init has the annealed temperature
# (--init-temp ... --temper-student) for the criteria of ANNEAL_CRITERIA and --finetune-from-model
# KD_STUDENT for those of FINETUNE_FROM_KD (the KD student must be trained by then).
init_options() {
  local kd=$STUDENTS_DIR/forward_kl_mean_distillation
  init=()
  [[ " $ANNEAL_CRITERIA " != *" $1 "* ]] ||
    init+=(--init-temp "$INIT_TEMP" --anneal-start "$ANNEAL_START" --anneal-end "$ANNEAL_END" --temper-student)
  [[ " $FINETUNE_FROM_KD " == *" $1 "* ]] || return 0
  if [ "$DRY_RUN" != 1 ] && [ ! -e "$kd/done" ]; then
    echo "error: $1 starts from the KD student, but $kd is not trained: put" \
      "forward_kl_mean_distillation before it in CRITERIA (or remove it from FINETUNE_FROM_KD)" >&2
    exit 1
  fi
  init+=(--finetune-from-model "$kd/checkpoint_best.pt")
}

# decode NAME CHECKPOINTS DATA SUBSET [ARGS...]: fairseq-pdd-generate (beam BEAM, n-best NBEST, the
# references forced too) -> $DECODE_DIR/NAME/uncertainty-SUBSET.jsonl (+ generate-SUBSET.txt); ARGS
# are the task's own (bpe, scoring, ...). fairseq-generate shards a split over every visible GPU
# unless told its world size, so decoding runs as one process.
decode() {
  local name=$1 path=$2 data=$3 subset=$4
  shift 4
  done_already "$DECODE_DIR/$name/uncertainty-$subset.jsonl" && return 0
  run fairseq-pdd-generate "$data" --user-dir "$USER_DIR" --path "$path" --gen-subset "$subset" \
    --beam "$BEAM" --nbest "$NBEST" --max-tokens "$GEN_MAX_TOKENS" "$@" --uncertainty-reference \
    --results-path "$DECODE_DIR/$name" --distributed-world-size 1 "${gen_args[@]}" "${gen_extra[@]}"
}

# decode_systems LABEL DATA SUBSETS -- [ARGS...]: the ensemble and the student of each criterion in
# CRITERIA decode each of SUBSETS (see decode; ARGS go to each). Sets systems (names), paths
# (checkpoints) and system_args (--system NAME=DIR for fairseq-pdd-evaluate).
decode_systems() {
  local label=$1 data=$2 subsets=() criterion i subset
  shift 2
  while [ "$1" != -- ]; do subsets+=("$1"); shift; done
  shift
  systems=(ensemble) paths=("$(ensemble)") system_args=()
  for criterion in $CRITERIA; do
    systems+=("$criterion") paths+=("$(ensemble_paths "$STUDENTS_DIR/$criterion")")
  done
  for i in "${!systems[@]}"; do
    for subset in "${subsets[@]}"; do
      stage "$label decode $subset with ${systems[$i]}"
      decode "${systems[$i]}" "${paths[$i]}" "$data" "$subset" "$@"
    done
    system_args+=(--system "${systems[$i]}=$DECODE_DIR/${systems[$i]}")
  done
}

# evaluate OUT_DIR IN_DOMAIN [ARGS...]: fairseq-pdd-evaluate --task $EVAL_TASK (ARGS: --system, --ood,
# ...) with n-best EVAL_NBEST and weighting EVAL_WEIGHTING; the report is written to OUT_DIR as a whole.
evaluate() {
  local out=$1 in_domain=$2
  shift 2
  done_already "$out/report.json" && return 0
  run rm -rf "$out.tmp"
  run fairseq-pdd-evaluate "$@" --in-domain "$in_domain" --task "$EVAL_TASK" --nbest "$EVAL_NBEST" \
    --weighting "$EVAL_WEIGHTING" --out-dir "$out.tmp"
  run rm -rf "$out"
  run mv "$out.tmp" "$out"
}

# evaluate_systems OUT_DIR IN_DOMAIN OOD...: evaluate (above) of the systems of decode_systems on the
# IN_DOMAIN subset, with OOD detection against each OOD subset; plots unless EVAL_PLOTS=0.
evaluate_systems() {
  local out=$1 in_domain=$2 ood_args=() plots=() subset
  shift 2
  for subset in "$@"; do ood_args+=(--ood "$subset=uncertainty-$subset.jsonl"); done
  [ "$EVAL_PLOTS" = 1 ] || plots=(--no-plots)
  evaluate "$out" "uncertainty-$in_domain.jsonl" "${system_args[@]}" "${ood_args[@]}" "${plots[@]}"
}

# run_stages SCRIPT...: the body of a recipe's run.sh: for each k in STAGES, `bash` the k-th SCRIPT
# (a file next to run.sh); USER_DIR is looked up once for all of them.
run_stages() {
  local dir s scripts=("$@")
  dir=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
  for s in $STAGES; do
    if ! [[ $s =~ ^[1-9][0-9]*$ ]] || [ "$s" -gt "${#scripts[@]}" ]; then
      echo "error: unknown stage '$s' in STAGES (1 to ${#scripts[@]})" >&2
      exit 1
    fi
  done
  export USER_DIR
  for s in $STAGES; do bash "$dir/${scripts[$((s - 1))]}"; done
}
