#!/usr/bin/env bash
# GPU figures for docs/performance.md (benchmarks/gpu.py): kpjax's training step and inference (with the fused 'mask'
# and the 'scatter' pool + unpool) against the PyTorch original on one H100/H200, the pool + unpool pair alone
# (mask vs scatter), and the largest 512x512 batch, in under 8 minutes (--budget-seconds bounds it). Writes
# OUT_DIR/gpu.json and OUT_DIR/gpu.md.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [gpu.py flags ...]     # OUT_DIR defaults to gpu_figures
#
# Needs a Python (PYTHON, default python3) with jax (CUDA), flax, optax, numpy and ml-collections for
# kpjax, and torch (CUDA) and dsntnn for the original. Wheels of missing pure-Python packages
# (ml-collections, dsntnn) can be carried along: WHEELS=DIR installs the missing ones from DIR only,
# never from a package index. Nothing else is installed or downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${1:-gpu_figures}"
[[ $# -gt 0 ]] && shift

needed=(jax flax optax numpy ml_collections)
[[ " $* " == *" --no-torch "* ]] || needed+=(torch dsntnn)
missing_modules() {
  local module
  for module in "${needed[@]}"; do
    "$PY" -c "import $module" 2>/dev/null || echo "$module"
  done
}
missing=($(missing_modules))
if [[ ${#missing[@]} -gt 0 && -n "${WHEELS:-}" ]]; then
  for module in "${missing[@]}"; do
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${module//_/-}" \
      || echo "# no installable wheel for $module in $WHEELS" >&2
  done
  missing=($(missing_modules))
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: $PY cannot import: ${missing[*]} (WHEELS=DIR installs carried wheels)" >&2
  exit 2
fi
"$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null \
  || { echo "error: jax sees no GPU here (gpu.py --tiny checks the script on a CPU)" >&2; exit 2; }

exec "$PY" benchmarks/gpu.py --out "$OUT" "$@"
