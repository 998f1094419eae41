#!/usr/bin/env bash
# Install everything (scripts/setup.sh --test --train: tests/test_lora.py needs torch) and run the
# test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test --train
exec .venv/bin/python -m pytest "$@"
