#!/usr/bin/env bash
# Install everything racto_nb's tests need on a fresh Debian machine, then run them all.
# Usage: bash scripts/test.sh [extra pytest args]
# Needs root (or sudo) only when a system package is missing; see README "Before you start".
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
need_apt=()
have redis-server || need_apt+=(redis-server)
# One test runs against RabbitMQ on 127.0.0.1:5672.
have rabbitmq-server || need_apt+=(rabbitmq-server)
# The one real-browser test drives Debian's Chromium (Playwright's own browser download is not used).
have chromium || need_apt+=(chromium)
# The first install compiles llama-cpp-python (llama.cpp) from source.
have cmake || need_apt+=(cmake)
{ have g++ && have gcc; } || need_apt+=(build-essential)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=""
  elif have sudo; then
    as_root="sudo"
  else
    echo "!! missing system packages: ${need_apt[*]}" >&2
    echo "   install them as root (apt-get install -y ${need_apt[*]}) and run this again" >&2
    exit 1
  fi
  echo "== installing ${need_apt[*]} (apt)"
  $as_root apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# RabbitMQ is a service; start it if it is down (the package's own start needs systemd, often absent).
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "== starting rabbitmq-server"
  if [ "$(id -u)" -eq 0 ]; then
    rabbitmq-server -detached || true
  elif have sudo; then
    sudo rabbitmq-server -detached || true
  fi
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi

echo "== installing racto_nb with its dev and local extras (llama-cpp-python compiles once, ~4.5 min on 2 cores)"
python -m pip install --quiet --upgrade pip
bash scripts/ensure_portable_llama.sh -e ".[dev,local]"
# A kernelspec of its own for the notebook tests; the user's "python3" kernel is left as it is.
python -m ipykernel install --user --name racto-nb-test --display-name "Python (racto_nb tests)" >/dev/null

echo "== lint and types"
ruff check racto_nb tests bench
mypy --explicit-package-bases racto_nb tests bench

echo "== tests"
python -m pytest -p no:cacheprovider -q "$@"
