#!/usr/bin/env bash
# The whole test suite: lint, format check, type check (mypy; settings in pyproject.toml), then
# pytest. Installs first if nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FORTIFY_VENV:-.venv}
if ! "$VENV/bin/python" -W ignore -c "import fortify, torch, pytest, xdist, torchattacks, tensorboard, timm, pkg_resources, mypy, importlib.util as u; assert u.find_spec('robustbench')" >/dev/null 2>&1; then
  FORTIFY_SKIP_DEMO=1 bash scripts/setup.sh
fi
echo "==> ruff check"; "$VENV/bin/ruff" check src tests bench
echo "==> ruff format --check"; "$VENV/bin/ruff" format --check src tests bench
echo "==> mypy"; "$VENV/bin/mypy"
echo "==> pytest"; OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -n "${FORTIFY_TEST_WORKERS:-2}" --dist worksteal "$@"
