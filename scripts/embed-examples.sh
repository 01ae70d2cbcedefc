#!/usr/bin/env bash
# Set up .venv and embed the example images into ./embeddings.
# The checkpoint: --checkpoint PATH (or a registry name such as vit_b when the download cache is available),
# or the SAMVIT_CHECKPOINT environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/samvit embed examples/images --out embeddings "$@"
