#!/usr/bin/env bash
# dem_jax launcher: one entry point for setup, tests, the demo and every stage of the pipeline.
#
#   ./launch.sh setup                  create .venv (Python >= 3.12) and install dem_jax; quick when nothing changed
#   ./launch.sh setup --gpu            the same, with jax[cuda12] for NVIDIA GPUs; remembered by later commands
#   ./launch.sh setup --cpu            back to the CPU-only install
#   ./launch.sh test [PYTEST_ARGS]     setup, then the whole test suite
#   ./launch.sh demo [WORKDIR]         setup, then the main job end to end on built-in sample data
#
# Every other command is dem_jax's own, the same as `dem-jax CMD` after `pip install` (setup first, then dem_jax's
# dispatcher; `./launch.sh CMD --help` lists a command's flags):
#   ./launch.sh sample_data --layout=dcase2018_task5 --out=DIR
#   ./launch.sh preprocess --dataset=dcase2018_task5 --data_dir=IN --output_dir=OUT [--num_workers=N]
#   ./launch.sh train --config=configs/dcase.py --workdir=W [--config.features_dir=OUT] [--distributed]
#   ./launch.sh evaluate --workdir=W [--features_dir=OUT] [--output_dir=O]
#   ./launch.sh embed --workdir=W --input=FILE_OR_DIR --output_dir=O
#   ./launch.sh bench preprocess|train_step|embed|embed_folder|input|gpu|quality [FLAGS]
#
# Versions come from constraints.txt. Every command checks the environment against a stamp (a hash of setup.cfg,
# pyproject.toml, constraints.txt and the extras) without starting pip; pip runs only when something changed, under
# a lock, so many processes started at once (srun) share one install and offline compute nodes work.
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
STAMP="$VENV/.dem_jax_setup"  # "<hash of the install inputs> <extras>"

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

# The extras an install gets: the tests, plots and TensorBoard always; oneDNN's CPU convolutions where its wheels
# exist (Linux x86_64; elsewhere XLA's convolutions run); the CUDA build of jax for a GPU install.
extras_for() {  # gpu|cpu
  local extras="test,plots,tensorboard"
  if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then extras="$extras,onednn"; fi
  if [ "$1" = gpu ]; then extras="$extras,cuda"; fi
  echo "$extras"
}

installed_extras() { [ -f "$STAMP" ] && cut -d' ' -f2 "$STAMP" || true; }

is_gpu_env() { case ",$(installed_extras)," in *,cuda,*) return 0 ;; *) return 1 ;; esac; }

wanted_stamp() {  # extras
  echo "$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1) $1"
}

is_up_to_date() { [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(wanted_stamp "$1")" ]; }

install() {  # extras; the caller holds the lock
  if [ ! -x "$PY" ]; then
    local base
    base="$(find_python)"
    echo "launch.sh: creating $VENV with $base" >&2
    "$base" -m venv "$VENV"
    "$PY" -m pip install --disable-pip-version-check --upgrade pip > "$VENV/setup.log" 2>&1 || true
  fi
  echo "launch.sh: installing dem_jax[$1] into $VENV (log: $VENV/setup.log)" >&2
  rm -f "$STAMP"
  if ! "$PY" -m pip install --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[$1]" \
       >> "$VENV/setup.log" 2>&1; then
    tail -n 30 "$VENV/setup.log" >&2
    echo "launch.sh: installation failed; the full log is $VENV/setup.log" >&2
    return 1
  fi
  # The oneDNN convolutions for CPU (dem_jax/ops/onednn.py); without them everything runs on XLA's, only slower.
  if [[ ",$1," == *,onednn,* ]] && ! "$PY" -m dem_jax.ops.onednn >> "$VENV/setup.log" 2>&1; then
    echo "launch.sh: oneDNN convolutions unavailable, CPU training uses XLA's (slower); see $VENV/setup.log" >&2
  fi
  wanted_stamp "$1" > "$STAMP"
}

# Makes the environment current for `kind` (gpu|cpu|remembered). The check reads files only; pip runs under an
# exclusive lock, and whoever waited for the lock checks again before installing.
setup() {
  local kind=remembered
  case "${1:-}" in
    --gpu) kind=gpu ;;
    --cpu) kind=cpu ;;
    "") ;;
    *) echo "launch.sh: setup takes --gpu or --cpu, not '$1'." >&2; return 2 ;;
  esac
  if [ "$kind" = remembered ]; then
    if [ -n "${DEM_JAX_GPU:-}" ] || is_gpu_env; then kind=gpu; else kind=cpu; fi
  fi
  local extras
  extras="$(extras_for "$kind")"
  is_up_to_date "$extras" && return 0
  mkdir -p "$VENV"
  if command -v flock > /dev/null; then
    exec 9> "$VENV/.dem_jax_setup.lock"
    flock 9
  fi
  is_up_to_date "$extras" || install "$extras"
  if command -v flock > /dev/null; then exec 9>&-; fi
}

print_help() { sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-help}"
  [ $# -gt 0 ] && shift
  case "$cmd" in
    setup) setup "$@" ;;
    test) setup; cd "$ROOT"; exec "$PY" -m pytest "$@" ;;
    help|-h|--help) print_help ;;
    *)
      # Every other command is dem_jax's own (`dem-jax CMD`): the dispatcher holds the command table (one module
      # per command in dem_jax/commands/), so a name is checked here only to spare a mistyped one the install.
      if [ ! -f "$ROOT/dem_jax/commands/$cmd.py" ] || [[ "$cmd" == _* ]]; then
        echo "launch.sh: unknown command '$cmd'. Try: ./launch.sh help" >&2; exit 2
      fi
      setup
      exec "$PY" -m dem_jax "$cmd" "$@" ;;
  esac
}

main "$@"
