#!/usr/bin/env bash
# Set up (if needed) and run the embedded CPU demo: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
exec bash recipes/toy/run.sh "$@"
