#!/usr/bin/env bash
# Install racto_nb with the local model and run the main job on the embedded default:
# a batch of 40 product reviews, one LLM call per row, printed as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
# The first run compiles llama-cpp-python (portably: see the script), about 4.5 minutes on 2 cores.
bash scripts/ensure_portable_llama.sh -e ".[local]"
python scripts/demo.py
