#!/usr/bin/env bash
# Every objective on SmolLM2-135M with the bundled principle ("Always reply in French"), at the
# same budget: 4 epochs x 32 samples x 32 new tokens, micro-batch 4, one pass (the same optimizer
# steps; PPO too), each at the same small lr sweep ($LRS, default "1e-4 3e-4"), validated on the
# held-out prompts before training and after the last epoch. Per objective the lr whose final
# validation is best (clean passes of the principle: not looping, not word salad; then principle
# rate, then NLL under pi_w) is kept (choose_lr.py), and evaluate.py judges the kept policies
# against SFT (the untrained model) and Prompting (the principle in the prompt). Then the table:
# judge-free figures, win rates, Elo.
#   bash experiments/principle_baselines/run.sh [out_dir] [extra train.py overrides]
#   LRS="3e-5 1e-4 3e-4" bash experiments/principle_baselines/run.sh /tmp/pb
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/principle_baselines}
shift || true
LRS=${LRS:-"1e-4 3e-4"}
for objective in inverse_q distill sft dpo ppo; do
  for lr in $LRS; do
    dir="$out/$objective/lr$lr"
    [ -f "$dir/final/config.json" ] && continue   # finished: a rerun continues the others
    python train.py objective=$objective alpha=1.5 lr=$lr passes_per_epoch=1 val.every_n_epochs=4 logger=csv hydra.run.dir="$dir" "$@"
  done
done
python experiments/principle_baselines/choose_lr.py "$out" > "$out/selected.tsv"
contestants=()
while IFS=$'\t' read -r name dir lr; do
  contestants+=("+contestants.$name.run_dir=$dir")
done < "$out/selected.tsv"
python evaluate.py name=principle_baselines out_dir="$out/evaluate" logger=csv "${contestants[@]}"
python experiments/principle_baselines/table.py "$out"
