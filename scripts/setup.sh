#!/usr/bin/env bash
# One-command set-up: virtual environment, PyTorch from this machine's local wheels, fortify with
# its test tools, the Fashion-MNIST Debian package where apt is available, then `fortify demo`.
# Set FORTIFY_SKIP_DEMO=1 to install only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FORTIFY_VENV:-.venv}

say() { printf '\n==> %s\n' "$*"; }

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "   could not install dataset-fashion-mnist; the demo will fall back to the bundled digits"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  say "installing PyTorch (local wheels where this machine has them)"
  case "$(uname -m)" in
    aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $TORCH
fi

say "installing fortify and its test tools"
"$VENV/bin/pip" install -q -e '.[dev]'

if [ "${FORTIFY_SKIP_DEMO:-0}" != 1 ]; then
  say "running the demo: fortify demo"
  "$VENV/bin/fortify" demo
fi
