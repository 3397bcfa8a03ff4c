#!/usr/bin/env bash
# The CPU demo, measured: share of held-out answers in French without the principle in the prompt,
# before training, with the principle in the prompt (Prompting baseline), and after training.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/french_style}
python train.py hydra.run.dir="$out/train"
python generate.py name=sft output="$out/sft.jsonl" hydra.run.dir="$out/gen_sft"
python generate.py name=prompting 'principle="Always reply in French, whatever language the user writes in."' \
  output="$out/prompting.jsonl" hydra.run.dir="$out/gen_prompting"
python generate.py name=trained run_dir="$out/train" output="$out/trained.jsonl" hydra.run.dir="$out/gen_trained"
# The share of French answers is measured during training already (held-out validation,
# "$out/train/plots/validation.png") and again by evaluate.py's judge-free figures below
# (principle rate by a language identifier, with its Wilson interval).
# Pairwise, as the paper evaluates: SmolLM2 itself judges (offline likelihood judge), with the
# principle as the criterion; win rates, Elo and plots land in "$out/evaluate".
python evaluate.py out_dir="$out/evaluate" "+contestants.trained.run_dir=\"$out/train\"" \
  "judge.criteria='The user requires every answer to be written in French. Choose the response that is written in French and answers the question; a response in any other language is worse.'"
