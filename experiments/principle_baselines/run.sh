#!/usr/bin/env bash
# Every objective on SmolLM2-135M with the bundled principle ("Always reply in French"), at the
# same budget: 4 epochs x 32 samples x 32 new tokens, micro-batch 4, one pass (the same optimizer
# steps; PPO too), the same lr, the same held-out validation. Then a judge-free table.
#   bash experiments/principle_baselines/run.sh [out_dir] [extra overrides, e.g. lr=5e-5]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/principle_baselines}
shift || true
for objective in inverse_q distill sft dpo ppo; do
  [ -f "$out/$objective/final/config.json" ] && continue   # finished: a rerun continues the others
  python train.py objective=$objective passes_per_epoch=1 logger=csv hydra.run.dir="$out/$objective" "$@"
done
python experiments/principle_baselines/table.py "$out"/*/
