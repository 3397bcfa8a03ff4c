#!/usr/bin/env bash
# Paper Sec. 5: Zephyr-7B-SFT aligned with a principle-prompted guide on HH-RLHF prefixes.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py model=zephyr alpha=1.4 strategy=deepspeed_zero3 logger.mode=online "$@"
