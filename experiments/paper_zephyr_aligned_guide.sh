#!/usr/bin/env bash
# Paper variant (b): pi_w is the already aligned Zephyr-7B-beta, pi_l the SFT model.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py model=zephyr guide=aligned_model alpha=1.4 strategy=deepspeed_zero3 guide.device=cpu logger.mode=online "$@"
