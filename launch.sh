#!/usr/bin/env bash
# dem_jax launcher: one entry point for setup, tests, the demo and every stage of the pipeline.
#
#   ./launch.sh setup                  create .venv (Python >= 3.12) and install dem_jax; quick when nothing changed
#   ./launch.sh setup --gpu            the same, with jax[cuda12] for NVIDIA GPUs
#   ./launch.sh test [PYTEST_ARGS]     setup, then the whole test suite
#   ./launch.sh demo [WORKDIR]         setup, then the main job end to end on built-in sample data
#   ./launch.sh sample_data --layout=dcase2018_task5 --out=DIR
#   ./launch.sh preprocess --dataset=dcase2018_task5 --data_dir=IN --output_dir=OUT [--num_workers=N]
#   ./launch.sh train --config=configs/dcase.py --workdir=W [--config.features_dir=OUT] [--distributed]
#   ./launch.sh evaluate --workdir=W [--features_dir=OUT] [--output_dir=O]
#   ./launch.sh embed --workdir=W --input=FILE_OR_DIR --output_dir=O
#   ./launch.sh bench preprocess|train_step|embed [FLAGS]
#
# Training uses every local accelerator by itself. Examples:
#   One node, all its GPUs:
#     ./launch.sh setup --gpu
#     ./launch.sh train --config=configs/dcase.py --workdir=/scratch/run1 --config.features_dir=/data/dcase_feats
#   Several nodes (run the same command on every node; SLURM's or Open MPI's variables are read by
#   jax.distributed.initialize, or name the coordinator yourself):
#     srun ./launch.sh train --config=configs/dcase.py --workdir=/shared/run1 --distributed
#     ./launch.sh train ... --distributed --coordinator_address=node0:1234 --num_processes=4 --process_id=$RANK
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${DEM_JAX_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

find_python() {
  local candidates=("${DEM_JAX_PYTHON:-}" python3.13 python3.12 python3)
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
  for v in "$pyenv_root"/versions/3.1[2-9]*/bin/python3; do candidates+=("$v"); done
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    local exe
    exe="$(command -v "$c" 2>/dev/null)" || continue
    if "$exe" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$exe"; return 0
    fi
  done
  echo "launch.sh: no Python >= 3.12 found. Install one (e.g. 'pyenv install 3.12') or set DEM_JAX_PYTHON=/path/to/python3.12." >&2
  return 1
}

setup() {
  local extras="test"
  if [ "${1:-}" = "--gpu" ] || [ -n "${DEM_JAX_GPU:-}" ]; then extras="test,cuda"; fi
  local stamp="$VENV/.dem_jax_setup"
  local want
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
  if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$PY" ]; then
    local base
    base="$(find_python)"
    echo "launch.sh: creating $VENV with $base" >&2
    "$base" -m venv "$VENV"
  fi
  echo "launch.sh: installing dem_jax[$extras] into $VENV (log: $VENV/setup.log)" >&2
  if ! { "$PY" -m pip install --disable-pip-version-check --upgrade pip &&
         "$PY" -m pip install --disable-pip-version-check -e "$ROOT[$extras]"; } > "$VENV/setup.log" 2>&1; then
    tail -n 30 "$VENV/setup.log" >&2
    echo "launch.sh: installation failed; the full log is $VENV/setup.log" >&2
    return 1
  fi
  # The oneDNN convolutions for CPU (dem_jax/onednn.py); without them everything runs on XLA's, only slower.
  if ! "$PY" -m dem_jax.onednn >> "$VENV/setup.log" 2>&1; then
    echo "launch.sh: oneDNN convolutions unavailable, CPU training uses XLA's (slower); see $VENV/setup.log" >&2
  fi
  echo "$want" > "$stamp"
}

# CPU-only environments get one malloc arena that keeps freed memory (cpu_ops.retain_freed_memory says why: XLA:CPU
# re-allocates its large step buffers every step, and fresh pages cost a page fault per 4 KiB). Set here, before the
# process starts, so that every thread of it sees the setting. Only for the commands that run XLA.
cpu_malloc_settings() {
  if ! grep -q cuda "$VENV/.dem_jax_setup" 2>/dev/null; then
    export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-1}" MALLOC_MMAP_MAX_="${MALLOC_MMAP_MAX_:-0}"
    export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-8589934592}"
  fi
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup "$@" ;;
  test)
    setup
    cpu_malloc_settings
    cd "$ROOT"
    exec "$PY" -m pytest "$@" ;;
  demo)
    setup
    cpu_malloc_settings
    exec "$PY" -m dem_jax.demo "$@" ;;
  sample_data) setup; exec "$PY" -m preprocess.sample_data "$@" ;;
  preprocess) setup; exec "$PY" -m preprocess "$@" ;;
  train) setup; cpu_malloc_settings; exec "$PY" -m dem_jax.train "$@" ;;
  evaluate) setup; cpu_malloc_settings; exec "$PY" -m dem_jax.evaluate "$@" ;;
  embed) setup; cpu_malloc_settings; exec "$PY" -m dem_jax.embed "$@" ;;
  bench)
    setup
    [ "${1:-}" = preprocess ] || cpu_malloc_settings
    exec "$PY" -m dem_jax.bench "$@" ;;
  help|-h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "launch.sh: unknown command '$cmd'. Try: ./launch.sh help" >&2; exit 2 ;;
esac
