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

USER_DIR=${USER_DIR:-$(fairseq-pdd-user-dir 2>/dev/null)}

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
