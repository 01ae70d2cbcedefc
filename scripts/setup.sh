#!/usr/bin/env bash
# Create .venv and install samvit into it. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test
# torch is pinned here (the package itself asks only for a range): torch 2.14.1 with torchvision 0.29.1 is the pair that
# imports together on the reference machines; the test oracles (segment-anything, timm) need torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
.venv/bin/python -m pip install -q --upgrade pip
# scripts/constraints.txt: versions of the object-storage stack that resolve together (see that file)
.venv/bin/python -m pip install -q -c scripts/constraints.txt "torch==2.14.1" "torchvision==0.29.1" -e "$spec"
