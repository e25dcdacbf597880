#!/usr/bin/env bash
# The accelerator benchmark from a plain checkout, no install: see benchmarks/accelerator.py.
#
#   bash benchmarks/accelerator.sh --out /tmp/bench              # ~8 min on a GPU or TPU
#   WHEELS=DIR bash benchmarks/accelerator.sh --out /tmp/bench   # first install DIR/*.whl
#   bash benchmarks/accelerator.sh --dry --out /tmp/bench        # toy sizes on the CPU
#
# WHEELS: a folder of the wheels the machine lacks (README "GPU and TPU" lists them); they
# are unpacked into a private folder put on PYTHONPATH, offline, without touching the
# machine's own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ -n "${WHEELS:-}" ]]; then
  site="${TMPDIR:-/tmp}/distill_jax_wheels"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/accelerator.py "$@"
