#!/usr/bin/env bash
# Install promtool (Debian's `prometheus` package) unless it is already on PATH.
# tests/test_metrics_live.py runs `promtool check metrics` and `promtool check rules` with it;
# without promtool those checks are skipped, so CI runs this before the tests.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null

command -v promtool >/dev/null 2>&1 || { echo "install-promtool: promtool still missing" >&2; exit 1; }
echo "install-promtool: $(promtool --version 2>&1 | head -n 1)"
