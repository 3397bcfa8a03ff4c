"""Guide scoring cost: both guides' targets (principle-prompted pi_w and plain pi_l, one pass)
against two plain no-grad transformers forward passes over the same tokens.

    python benchmarks/guide_scoring.py                 # SmolLM2-135M, 32 samples x 32 tokens
    python benchmarks/guide_scoring.py --model tiny
    python benchmarks/guide_scoring.py --general       # also the general path, in the same run
    python benchmarks/guide_scoring.py --principles 2  # guide.principles: K winners, K + 1 passes

The baseline is what a straightforward implementation does: model(x_w + y) and model(x + y),
full logits over every position, batched the same way. Goal: ratio <= 1.1.

Guide scoring takes the one-head path where the model allows it (guides.py's docstring: one
head product for the targets); --general also times the general path (both guides' logits) on
the same samples, for a before/after comparison in one run. With --principles K (several
principles, pi_hat the product of K winners) the baseline is K + 1 plain forwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--general", action="store_true", help="also time the general path (both guides' logits)")
    parser.add_argument("--principles", type=int, default=1, help="K principles (guide.principles): K + 1 guide passes")
    args = parser.parse_args()

    from iq_lightning.forward import pack, to_device
    from iq_lightning.guides import PrincipleGuide
    from iq_lightning.models import frozen_copy

    model, tokenizer = common.load(args.model)
    model = frozen_copy(model)
    prompts = common.prompts(tokenizer, args.samples)
    responses = common.random_responses(tokenizer, args.samples, args.tokens)
    texts = ["Always reply in French.", "Answer in one sentence.", "Write in lowercase letters only.", "Be polite."]
    k = args.principles
    if not 1 <= k <= len(texts):
        parser.error(f"--principles takes 1 to {len(texts)}")
    principles, alphas = (texts[0], 1.5) if k == 1 else (texts[:k], [1.5 / k] * k)
    guide = PrincipleGuide(model, tokenizer, principles, "system", alphas, batch_size=args.batch, show_progress=False)
    general = PrincipleGuide(model, tokenizer, principles, "system", alphas, batch_size=args.batch, show_progress=False)
    general._one_head = False  # the path every model can take
    winners = [[guide.winner_prompt_ids(p, i) for p in prompts] for i in range(k)]

    def ours():
        guide.score(prompts, responses)

    def general_path():
        general.score(prompts, responses)

    @torch.inference_mode()
    def plain_forwards():
        for start in range(0, args.samples, args.batch):
            chunk = slice(start, start + args.batch)
            for prompt_ids in (*(w[chunk] for w in winners), [p.input_ids for p in prompts[chunk]]):
                batch = to_device(pack(prompt_ids, responses[chunk], tokenizer.pad_token_id, share_prefix=False), model.device)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])

    tokens = sum(len(p.input_ids) + (k + 1) * args.tokens for p in prompts) + sum(len(ids) for w in winners for ids in w)
    base = common.median_seconds(plain_forwards, args.repeats)
    mine = common.median_seconds(ours, args.repeats)
    print(f"model={args.model} samples={args.samples} response_tokens={args.tokens} batch={args.batch} principles={k} threads={torch.get_num_threads()}")
    print(f"{k + 1} plain forwards   : {base:.2f} s ({tokens / base:.0f} tokens/s)")
    path = "one-head" if guide.one_head else "general: the model's head is not mixable"
    print(f"guide scoring      : {mine:.2f} s ({tokens / mine:.0f} tokens/s; {path})")
    if args.general:
        slow = common.median_seconds(general_path, args.repeats)
        print(f"general path       : {slow:.2f} s ({tokens / slow:.0f} tokens/s; ratio general/plain {slow / base:.2f})")
    print(f"ratio scoring/plain: {mine / base:.2f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
