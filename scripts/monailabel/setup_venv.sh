#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs MONAI Label with this repository's bundle.
#
#   bash scripts/monailabel/setup_venv.sh [VENV]
#
# VENV defaults to $MGRAD_MONAILABEL_VENV, else ~/.cache/mgrad-net/monailabel-venv: outside the
# clone, so that every clone (and CI's fresh one) on a machine shares one build.
#
# MONAI Label lives in a venv of its own: it needs torch and torchvision as a matching pair
# (torch 2.14.1 + torchvision 0.29.1, several GB) and pins numpy < 2, unlike the project's venv.
# That is the smallest venv these machines allow: PyPI has torchvision only as CUDA builds (beside
# the CPU torch 2.13.0 wheel even its own pair 0.28.0 fails, "operator torchvision::nms does not
# exist", measured), and the CPU builds come only from PyTorch's own index, which they cannot reach.
# The packages of requirements.txt are installed once (minutes) and reused while that file and the
# Python version stay the same; this repository is (re)installed into it, editable, on every call
# (seconds), so the venv always runs the clone that called it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${MGRAD_MONAILABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mgrad-net/monailabel-venv}}"
python="${PYTHON:-python3}"
req="$here/requirements.txt"
stamp="$venv/.mgrad-net-stamp"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock -w 3600 9 || { echo "setup_venv.sh: another build of $venv holds $venv.lock" >&2; exit 1; }

want="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ -x "$venv/bin/monailabel" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "MONAI Label venv up to date: $venv"
else
  echo "building the MONAI Label venv in $venv (several GB; minutes)"
  rm -f "$stamp"
  "$python" -m venv "$venv"
  echo '*' > "$venv/.gitignore"   # keeps a venv placed inside a repository out of git
  "$venv/bin/python" -m pip install -r "$req"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -m pip install -q -e "$repo"
# the imports that fail with a mismatched torch/torchvision pair or with pydicom 3, and this clone's package
"$venv/bin/python" - "$repo" <<'EOF'
import sys
from pathlib import Path

import monailabel
import monailabel.datastore.utils.convert  # pydicom_seg
import monailabel.tasks.infer.bundle
import monailabel.transform.post  # torchvision
import torch

import mgrad_net.networks

where = Path(mgrad_net.__file__).resolve()
if not where.is_relative_to(Path(sys.argv[1]).resolve()):
    sys.exit(f"mgrad_net imports from {where}, not from {sys.argv[1]}")
print(f"MONAI Label venv ready: monailabel {monailabel.__version__}, torch {torch.__version__}, mgrad_net from {where.parent}")
EOF
