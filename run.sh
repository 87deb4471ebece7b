#!/usr/bin/env bash
# Quick start. Sets everything up in .venv (idempotent), then:
#   bash run.sh main [key=value ...]   the main job on the embedded default
#   bash run.sh test [pytest args ...] the lint (ruff check, ruff.toml) and the test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
# torch first and pinned: an unpinned torch pulled in by deepspeed drags several GB of CUDA packages
# onto a CPU machine. Override TORCH_SPEC for another build (e.g. a CUDA wheel on a GPU box).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
  fi
  local stamp=".venv/.installed-$(cat setup.py | sha256sum | cut -c1-16)-${TORCH_SPEC//[^A-Za-z0-9.]/_}"
  if [ ! -f "$stamp" ]; then
    echo "== installing $TORCH_SPEC, then perturbdiff and its dependencies"
    .venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev,eval]"
    touch "$stamp"
  fi
}

cmd=${1:-main}
shift || true
case "$cmd" in
  main) setup; exec .venv/bin/perturbdiff demo "$@" ;;
  test) setup; .venv/bin/ruff check --quiet . || { echo "ruff check failed (ruff.toml)" >&2; exit 1; }
        exec .venv/bin/python -m pytest -q tests "$@" ;;
  *) echo "usage: bash run.sh main|test [args...]" >&2; exit 2 ;;
esac
