#!/usr/bin/env bash
# Paper Sec. 5: Zephyr-7B-SFT aligned with a principle-prompted guide on HH-RLHF prefixes.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py model=zephyr alpha=1.4 strategy=deepspeed_zero3 logger.mode=online "$@"
# Evaluation as in the paper (Sec. 5.2-5.3): GPT-4-turbo judge on HH-RLHF test prompts and on
# BeaverTails-Evaluation (per-category radar), against SFT and Prompting. Needs $OPENAI_API_KEY.
# run=outputs/<date>/<time>
# python evaluate.py model=zephyr name=zephyr_hh data=hh_rlhf data.split=test data.limit=500 \
#   judge=openai "+contestants.inverse_q.run_dir=\"$run\""
# python evaluate.py model=zephyr name=zephyr_beavertails data=beavertails judge=openai \
#   "+contestants.inverse_q.run_dir=\"$run\""
