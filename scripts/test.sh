#!/usr/bin/env bash
# Set up .venv with the test oracles (segment-anything, timm, transformers, ...) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q --durations=15 "$@"
