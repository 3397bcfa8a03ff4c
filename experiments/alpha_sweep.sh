#!/usr/bin/env bash
# Paper Fig. 7: alpha from 1.0 to 1.5, one run directory each under multirun/.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m alpha=1.0,1.1,1.2,1.3,1.4,1.5 "$@"
# Fig. 7: each alpha's win rate minus lose rate against the SFT model (set judge=openai for GPT-4).
sweep=$(ls -d multirun/*/* | tail -n 1)
# Without a judge: each run's held-out principle rate and NLL under pi_w after its last epoch.
python -m iq_lightning.validation_plots "$sweep"
python evaluate.py name=alpha_sweep sweep_dir="\"$sweep\"" pairs=reference
