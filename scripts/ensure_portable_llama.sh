#!/usr/bin/env bash
# Install with pip so that llama-cpp-python is built portably, then check the build that is installed.
#
# Usage: bash scripts/ensure_portable_llama.sh [pip install arguments...]
#   e.g. bash scripts/ensure_portable_llama.sh -e ".[local]"      (PYTHON=... picks the interpreter)
#
# Why: pip builds llama-cpp-python from source with GGML_NATIVE=ON by default. On a CPU with Intel
# AMX that compiles llama.cpp's AMX path, which segfaults in ggml_backend_amx_mul_mat on the first
# prompt. So every build here gets -DGGML_NATIVE=OFF (added to any CMAKE_ARGS you set). pip's wheel
# cache keeps whichever build came first, though: a native wheel cached earlier would be reinstalled
# as it is. So after installing, the build is checked (llama.cpp's own system info), and a native
# AMX build on an AMX CPU is removed from pip's cache and rebuilt portably (about 4 minutes on 2 cores).
# racto_nb's LocalKit also avoids that path at load time; this keeps every other user of the package safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

case "${CMAKE_ARGS:-}" in
  *GGML_NATIVE*) ;;  # the caller chose; respect it
  *) export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_NATIVE=OFF" ;;
esac

if [ "$#" -gt 0 ]; then
  "$PY" -m pip install --quiet "$@"
fi

# Prints "<state> <version>": missing, broken, amx-native (would crash here) or ok.
check() {
  "$PY" - <<'EOF'
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llama_cpp") is None:
    print("missing -")
    sys.exit()
try:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
except Exception as exc:  # a broken install: say so, the caller rebuilds it
    print("broken -", type(exc).__name__, exc)
    sys.exit()
# The same test LocalKit's model process applies (racto_nb/kits/llama_child.py), read without importing racto_nb.
cpuinfo = Path("/proc/cpuinfo")
text = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
flags = next((set(line.partition(":")[2].split()) for line in text.splitlines() if line.startswith("flags")), set())
cpu_amx = bool({"amx_tile", "amx_int8"} & flags)
state = "amx-native" if cpu_amx and "AMX_INT8 = 1" in info else "ok"
print(state, llama_cpp.__version__)
EOF
}

read -r state version rest < <(check)
case "$state" in
  missing)
    echo "== llama-cpp-python is not installed (nothing to check)"
    exit 0 ;;
  ok)
    echo "== llama-cpp-python $version is safe here: AMX is not compiled in, or not on this CPU (build checked)"
    exit 0 ;;
esac

if [ "$state" = broken ]; then
  echo "== llama-cpp-python does not import ($rest); reinstalling it portably"
  spec="llama-cpp-python"
else
  echo "== llama-cpp-python $version was built natively with AMX on an AMX CPU (a wheel pip cached earlier?)"
  echo "   removing it from pip's cache and rebuilding it portably (CMAKE_ARGS=\"$CMAKE_ARGS\", about 4 minutes)"
  spec="llama-cpp-python==$version"
fi
"$PY" -m pip cache remove 'llama_cpp_python-*' >/dev/null 2>&1 || true
"$PY" -m pip install --quiet --force-reinstall --no-cache-dir --no-deps "$spec"

read -r state version rest < <(check)
if [ "$state" != ok ]; then
  echo "!! llama-cpp-python is still not portable after the rebuild ($state $version $rest)" >&2
  exit 1
fi
echo "== llama-cpp-python $version rebuilt portably"
