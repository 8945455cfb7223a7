#!/usr/bin/env bash
# The image's self-check (docker/check.py says what it checks):
#
#   docker run --gpus all --rm bdd-sdxl bash docker/check.sh
#
# Exit status: 0 all checks passed on a GPU; 1 a check failed; 3 no GPU visible (CPU-only host, or no --gpus all).
# Environment: PYTHON (default: the repo's .venv if present, else python), as for the stage launchers.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then py="$repo_root/.venv/bin/python"; else py="python"; fi
fi
cd "$repo_root"
exec "$py" docker/check.py "$@"
