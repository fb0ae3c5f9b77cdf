#!/usr/bin/env bash
# The MONAI Label integration test (pytest marker `monailabel`; opt-in, .ci/run runs it after the test command):
# builds or reuses MONAI Label's own venv (scripts/monailabel/setup_venv.sh; $MGRAD_MONAILABEL_VENV,
# default ~/.cache/mgrad-net/monailabel-venv), starts a real server on 127.0.0.1 and talks HTTP to it.
# Run it with the project's environment active (the one `pip install -e ".[test]"` made).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pytest -q -m monailabel tests/test_monailabel.py "$@"
