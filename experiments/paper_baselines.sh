#!/usr/bin/env bash
# The paper's comparison on Zephyr-7B-SFT with HH-RLHF prefixes (Sec. 5), every objective with the
# same sampler, data, budget (15 epochs x 500 samples) and evaluation as Inverse-Q*. Check each
# plan first: add dry_run=true (offline, loads nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
common=(model=zephyr strategy=deepspeed_zero3 logger.mode=online "$@")
python train.py "${common[@]}" alpha=1.4 hydra.run.dir=outputs/paper_baselines/inverse_q
# On-policy distillation to pi_w (alpha 1: TRL's SDFT with the principle as privileged context).
python train.py "${common[@]}" objective=distill alpha=1 hydra.run.dir=outputs/paper_baselines/distill
# Context distillation: pi_w's answers to the HH-RLHF prompts, drawn once, then SFT.
python train.py "${common[@]}" objective=sft hydra.run.dir=outputs/paper_baselines/sft
# The paper's DPO: HH-RLHF's own chosen/rejected replies (objective.pairs=dataset, the default with
# data=hh_rlhf), read once; samples_per_epoch counts replies, two per pair.
python train.py "${common[@]}" objective=dpo objective.pairs=dataset hydra.run.dir=outputs/paper_baselines/dpo
# The paper's PPO (per-token KL to pi_ref, value head, GAE, 4 PPO epochs per batch of rollouts).
# Its value head lives beside the policy, outside a sharded model, so PPO runs under DDP, with LoRA
# adapters (peft keeps them float32 over the bfloat16 base: an lr-1e-6 step survives) to fit 80 GB;
# reward: objective.reward_model=<a sequence-classification model>, or the guides' contrastive reward.
python train.py model=zephyr strategy=ddp strategy.accelerator=gpu model.lora.enabled=true model.dtype=bfloat16 \
  logger.mode=online "$@" objective=ppo hydra.run.dir=outputs/paper_baselines/ppo
# Then: python evaluate.py model=zephyr data=hh_rlhf data.split=test data.limit=500 judge=openai \
#   '+contestants.inverse_q.run_dir="outputs/paper_baselines/inverse_q"' \
#   '+contestants.distill.run_dir="outputs/paper_baselines/distill"' '+contestants.sft_cd.run_dir="outputs/paper_baselines/sft"' \
#   '+contestants.dpo.run_dir="outputs/paper_baselines/dpo"' '+contestants.ppo.run_dir="outputs/paper_baselines/ppo"'
