#!/usr/bin/env bash
# System pieces the test suite needs beyond pip: Debian's chromium (headless browser
# tests) and the Jupyter widget JavaScript from npm (rendering widgets offline).
# Idempotent: does nothing that is already done.
set -euo pipefail
PY=${1:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v chromium > /dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi
