#!/usr/bin/env bash
# Install everything racto_nb's tests need on a fresh Debian machine, then run them all.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The one real-browser test drives Debian's Chromium (Playwright's own browser download is not used).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "== installing ${need_apt[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# RabbitMQ is a service on this machine kind; start it if it is installed but down.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "== starting rabbitmq-server"
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
  fi
fi

echo "== installing racto_nb with its dev and local extras (llama-cpp-python compiles once, ~4.5 min on 2 cores)"
python -m pip install --quiet --upgrade pip
bash scripts/ensure_portable_llama.sh -e ".[dev,local]"
python -m ipykernel install --user --name python3 >/dev/null

echo "== lint and types"
ruff check racto_nb tests bench
mypy racto_nb

echo "== tests"
python -m pytest -p no:cacheprovider -q "$@"
