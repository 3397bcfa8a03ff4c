#!/usr/bin/env bash
# Inverse-Q*'s trade-off on SmolLM2-135M (issue 24): every setting of settings.tsv (alpha x lr,
# rollout temperature / top-p, the epoch budget, the Huber penalty, target clipping, the alpha
# warm-up) trained once (seed 0) at the default budget, validated on the held-out prompts every
# epoch; the settings on the Pareto front of clean-pass rate against NLL under pi_w (table.py
# --front) then run again with seeds 1 and 2; then the table and the two figures (clean passes
# against NLL under pi_w, and against repetition; base and teacher as points, front drawn).
#   bash experiments/tradeoff/run.sh [out_dir] [extra train.py overrides]
#   bash experiments/tradeoff/run.sh outputs/tradeoff_sentence guide=one_sentence   # the second bundled principle
#   SETTINGS=my.tsv SEEDS="0" FRONT_SEEDS="1 2" RECOMMENDED="a1.2_lr1e-4" bash experiments/tradeoff/run.sh
# SETTINGS: name<TAB>overrides lines; RECOMMENDED: names to rerun with FRONT_SEEDS instead of the
# front's. A finished run (final/ written) is skipped, so a rerun continues where it stopped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
out=${1:-outputs/tradeoff}
shift || true
SETTINGS=${SETTINGS:-$here/settings.tsv}
SEEDS=${SEEDS:-0}
FRONT_SEEDS=${FRONT_SEEDS:-"1 2"}
mkdir -p "$out"
grep -v '^#' "$SETTINGS" | grep -v '^[[:space:]]*$' > "$out/settings.tsv"

train() {  # name seed overrides...
  local name=$1 seed=$2 dir="$out/$1/seed$2"
  shift 2
  [ -d "$dir/final" ] && return 0
  # shellcheck disable=SC2086  # the settings' overrides are words
  python train.py $1 seed="$seed" val.every_n_epochs=1 logger=csv hydra.run.dir="$dir" "${@:2}"
}

while IFS=$'\t' read -r name overrides; do
  for seed in $SEEDS; do train "$name" "$seed" "$overrides" "$@"; done
done < "$out/settings.tsv"

recommended=${RECOMMENDED:-$(python "$here/table.py" "$out" --front)}
for name in $recommended; do
  overrides=$(awk -F'\t' -v n="$name" '$1 == n {print $2}' "$out/settings.tsv")
  for seed in $FRONT_SEEDS; do train "$name" "$seed" "$overrides" "$@"; done
done
python "$here/table.py" "$out" --figures "$out" | tee "$out/table.md"
