#!/usr/bin/env bash
# The project's GPU check: one command, no network, under 8 minutes on one GPU (sized for an H200).
# Builds its own synthetic data (a 40,000-symbol joined dictionary), trains 10 teachers, and reports in
# one JSON (default benchmarks/results/gpu_check.json) + a table: fairseq-train tokens/s and peak memory
# of cross-entropy vs PD-EnD2 (10 online teachers, and from a teacher cache) at Transformer-big fp16,
# bench_criteria.py --device cuda --preset big, and the overhead of fairseq-pdd-generate over
# fairseq-generate for a Dirichlet student and an ensemble of 2, with identical hypotheses checked
# (exit status 1 if they differ). What runs and how it is measured: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                    # GPU
#   bash benchmarks/gpu_check.sh --cpu              # tiny sizes on CPU (the CI smoke run, < 1 minute)
#   bash benchmarks/gpu_check.sh --out r.json --work /tmp/gc --members 5 --criteria-args "--repeats 5"
#
# PYTHON (default python3): the interpreter that imports fairseq and fairseq_pdd (e.g. PYTHONPATH set
# to a folder of wheels and this checkout); no console script is needed. Every tool runs inside that
# one Python process (fairseq's own entry points), since importing fairseq costs seconds per process.
set -euo pipefail
: "${PYTHON:=python3}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
