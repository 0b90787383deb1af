#!/usr/bin/env bash
# Stage 3: sequence-level distillation data. The teacher ensemble translates the training sources
# (beam DISTILL_BEAM, n-best DISTILL_NBEST; one shard per GPU of the NNODES x NGPU);
# the hypotheses are put back in sample-id order and binarised with the teachers' dictionaries as
# the students' training set: $DISTILL_DATA/train holds only the ensemble's translations (the
# authors' `--upsample-primary 0` set-up, as a dedicated data folder). valid_ens_pred / test_ens_pred
# are valid / test with the ensemble's translations as references; valid, test and the OOD splits
# are linked from $DATA.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

GEN=$WORK/distill/generate
OUT=$WORK/distill/text
ENSEMBLE=$(ensemble)
# shellcheck disable=SC2034
generate_args=(--path "$ENSEMBLE" --beam "$DISTILL_BEAM" --nbest "$DISTILL_NBEST" --max-tokens "$GEN_MAX_TOKENS"
  --user-dir "$USER_DIR" "${gen_args[@]}" "${gen_extra[@]}")

if [ "$DISTILL_NBEST" != 1 ]; then
  echo "error: DISTILL_NBEST=$DISTILL_NBEST: the distillation data takes one translation per source (1)" >&2
  exit 1
fi

# fairseq-generate shards a split over --distributed-world-size (default: every visible GPU), so the
# world size is always given; shard r of w decodes every w-th batch and keeps the global sample ids.
# One shard per GPU: node n decodes shards n*NGPU .. n*NGPU+NGPU-1 of NGPU*NNODES.
SHARDS=$((NGPU * NNODES))
stage "3/5 distillation data: the ensemble translates train ($SHARDS shards) -> $GEN"
IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES:-}"
pids=() status=0
for ((i = 0; i < NGPU; i++)); do
  shard=$((NODE_RANK * NGPU + i))
  out=$GEN/train.$shard-of-$SHARDS.txt
  done_already "$out" && continue
  device=()
  [ "$DEVICE" = cpu ] || device=(env CUDA_VISIBLE_DEVICES="${visible[$i]:-$i}")
  run_to "$out" "${device[@]}" fairseq-generate "$DATA" --gen-subset train "${generate_args[@]}" \
    --distributed-world-size "$SHARDS" --distributed-rank "$shard" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || exit "$status"
shards=()
for ((r = 0; r < SHARDS; r++)); do shards+=("$GEN/train.$r-of-$SHARDS.txt"); done

if [ "$NODE_RANK" != 0 ]; then  # node 0 binarises once every node's shards are there
  wait_for "$DISTILL_DATA/dict.$TGT.txt"
  exit 0
fi
wait_for "${shards[@]}"

for split in valid test; do
  stage "3/5 distillation data: the ensemble translates $split -> $GEN/$split.txt"
  done_already "$GEN/$split.txt" || run_to "$GEN/$split.txt" fairseq-generate "$DATA" --gen-subset "$split" \
    "${generate_args[@]}" --distributed-world-size 1
done

stage "3/5 distillation data: hypotheses in sample-id order -> $OUT"
for split in train valid test; do
  done_already "$OUT/$split.$TGT" && continue
  if [ "$split" = train ]; then outputs=("${shards[@]}") source=$TEXT/clean/train.$SRC
  else outputs=("$GEN/$split.txt") source=$TEXT/spm/$split.$SRC; fi
  pdd_script data/mt_text.py extract "${outputs[@]}" --source "$source" \
    --out-source "$OUT/$split.$SRC" --out-target "$OUT/$split.$TGT"
done

stage "3/5 distillation data: fairseq-preprocess with the teachers' dictionaries -> $DISTILL_DATA"
if ! done_already "$DISTILL_DATA/dict.$TGT.txt"; then
  run rm -rf "$DISTILL_DATA.tmp"
  run fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
    --srcdict "$DATA/dict.$SRC.txt" --tgtdict "$DATA/dict.$TGT.txt" \
    --trainpref "$OUT/train" --testpref "$OUT/valid,$OUT/test" --destdir "$DISTILL_DATA.tmp" --workers "$THREADS"
  rename_split "$DISTILL_DATA.tmp" test valid_ens_pred
  rename_split "$DISTILL_DATA.tmp" test1 test_ens_pred
  mapfile -t ood < <(ood_names)
  for split in valid test "${ood[@]}"; do
    for lang in "$SRC" "$TGT"; do
      for ext in bin idx; do
        run ln -sr "$DATA/$split.$SRC-$TGT.$lang.$ext" "$DISTILL_DATA.tmp/"
      done
    done
  done
  run mv "$DISTILL_DATA.tmp" "$DISTILL_DATA"
fi
