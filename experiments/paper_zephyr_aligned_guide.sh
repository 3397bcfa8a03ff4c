#!/usr/bin/env bash
# Paper variant (b): pi_w is the already aligned Zephyr-7B-beta, pi_l the SFT model. Both guides are
# sharded over the GPUs like the policy (ZeRO-3 inference engines); add dry_run=true to see the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py model=zephyr guide=aligned_model alpha=1.4 strategy=deepspeed_zero3 logger.mode=online "$@"
