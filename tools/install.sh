#!/usr/bin/env bash
# Install megatron_tlt for CPU use: pins the CPU torch wheel first (an unpinned torch pulls a multi-GB
# CUDA build), then the package. GPU users: install your own CUDA torch, then `pip install -e ".[gpu]"`.
#   bash tools/install.sh        # package only
#   bash tools/install.sh test   # package + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extra}"
# The tests also lint launch/*.sh with shellcheck (tests/test_launch.py): install it where apt is at hand.
if [ "${1:-}" = "test" ] && ! command -v shellcheck > /dev/null && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq shellcheck > /dev/null) || echo "install.sh: shellcheck not installed; tests/test_launch.py skips it"
fi
