"""Training-step efficiency: achieved FLOP/s of the policy forward+backward (6 x params x tokens)
against this machine's float32 matmul peak, both measured in this run.

    python benchmarks/train_step.py                    # SmolLM2-135M, 4 x 256 tokens
    python benchmarks/train_step.py --model tiny --seq 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = common.median_seconds(lambda: a @ b, repeats, warmup=2)
    return 2 * n**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="prompt + response tokens per sample")
    parser.add_argument("--response", type=int, default=128, help="response tokens per sample (the loss part)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from iq_lightning.forward import pack
    from iq_lightning.module import InverseQModule
    from iq_lightning.rollouts import collate  # noqa: F401  (same layout as training batches)

    model, tokenizer = common.load(args.model)
    module = InverseQModule(model, guide=None, lr=1e-4)
    prompt_len = args.seq - args.response
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, len(tokenizer), (args.batch, prompt_len), generator=g).tolist()
    responses = torch.randint(3, len(tokenizer), (args.batch, args.response), generator=g).tolist()
    batch = pack(prompts, responses, tokenizer.pad_token_id)
    batch["target_logprobs"] = torch.full((args.batch, args.response), -3.0)
    batch["ref_logprobs"] = torch.full((args.batch, args.response), -3.0)

    def step():
        model.zero_grad(set_to_none=True)
        module.batch_metrics(batch)["loss"].backward()

    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tokens = args.batch * args.seq
    # A stricter count: the embedding lookup is no matmul, and the (tied) LM head only projects
    # the response positions (logits_to_keep).
    strict_flops = 6 * (params - embedding) * tokens + 6 * embedding * args.batch * (args.response + 1)
    seconds = common.median_seconds(step, args.repeats)
    peak = matmul_peak()
    achieved = 6 * params * tokens / seconds
    print(f"model={args.model} params={params / 1e6:.1f}M batch={args.batch} seq={args.seq} threads={torch.get_num_threads()}")
    print(f"matmul peak (2048^2 fp32): {peak / 1e9:.1f} GFLOP/s")
    print(f"forward+backward         : {seconds:.2f} s/step, {achieved / 1e9:.1f} GFLOP/s (6 x params x tokens)")
    print(f"efficiency               : {achieved / peak:.0%} of the matmul peak (goal >= 70%)")
    print(f"strict count             : {strict_flops / seconds / 1e9:.1f} GFLOP/s = {strict_flops / seconds / peak:.0%} of the peak "
          "(embedding lookup excluded, LM head on response positions only)")


if __name__ == "__main__":
    main()
