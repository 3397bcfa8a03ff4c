"""HF generate on a ZeRO-3 policy (sharded.ready_for_generate): two CPU processes (gloo,
DeepSpeed's CPU accelerator) train-shard the tiny model as Lightning's DeepSpeed strategy does
(an engine with an optimizer, whose hooks gather each module's partitions around its forward).

Left to the hooks, generate all-gathers every parameter once per decoding step. Within the
memory plan's headroom the whole policy is gathered once around the call instead: each
parameter is fetched exactly once, the tokens and log-probs are those of the unsharded model on
one process, and afterwards the hooks are back (a training step runs, the weights are
partitioned again). Gathers are counted at DeepSpeed's per-parameter all-gather entry points."""

from __future__ import annotations

import collections
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import has_module
from iq_lightning.config import TinySpec
from iq_lightning.models import build_tiny
from iq_lightning.samplers.base import SamplingParams
from iq_lightning.samplers.hf import HFSampler

pytestmark = pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")

NEW_TOKENS = 6
# Different prompts (and lengths) per rank, as each rank samples its own share.
PROMPTS = {0: [[5, 17, 29], [7, 9, 11, 13]], 1: [[3, 4, 5, 6, 7, 8], [40, 41]]}


class Holder(torch.nn.Module):
    """The policy inside a wrapper, as DeepSpeed's engine holds the LightningModule."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids):
        return self.policy(input_ids=input_ids).logits


def _count_gathers(model, counts: collections.Counter) -> None:
    """Count, per parameter, every all-gather DeepSpeed starts for it (the coordinator's fetch
    and GatheredParameters both call these per-parameter entry points with the list to gather)."""
    for param in model.parameters():
        for attr in ("all_gather", "all_gather_coalesced"):
            original = getattr(param, attr)

            def counted(param_list=None, *args, _original=original, _param=param, **kwargs):
                for p in param_list if param_list is not None else [_param]:
                    counts[id(p)] += 1
                return _original(param_list, *args, **kwargs)

            setattr(param, attr, counted)


def _scenario(rank: int) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model, tokenizer = build_tiny(TinySpec())
    reference = copy.deepcopy(model)
    holder = Holder(model)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        # 0: every parameter partitioned (the default keeps the tiny model's small ones whole).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=holder, optimizer=torch.optim.AdamW(holder.parameters(), lr=1e-2), config=config)
    policy = engine.module.policy
    assert all(p.numel() == 0 for p in policy.parameters())  # partitioned
    counts: collections.Counter = collections.Counter()
    _count_gathers(policy, counts)

    prompts, params = PROMPTS[rank], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, seed=3)
    make = lambda **kw: HFSampler(2, [tokenizer.eos_token_id], tokenizer.pad_token_id, show_progress=False, **kw)  # noqa: E731
    want = make().generate(reference, prompts, params)  # one process, whole weights

    whole = sum(p.ds_numel * p.element_size() for p in policy.parameters())
    per_token = make(synced_gpus=True, gather_whole_up_to=whole - 1).generate(policy, prompts, params)  # does not fit: hooks gather
    hooks_counts = [counts[id(p)] for p in policy.parameters()]
    counts.clear()
    once = make(synced_gpus=True, gather_whole_up_to=whole).generate(policy, prompts, params)
    once_counts = [counts[id(p)] for p in policy.parameters()]

    for got in (per_token, once):
        assert [g.response_ids for g in got] == [g.response_ids for g in want]
        for g, w in zip(got, want):
            assert g.sampling_logprobs == pytest.approx(w.sampling_logprobs, abs=1e-5)
    assert any(len(g.response_ids) == NEW_TOKENS for g in want)  # several decoding steps ran
    assert min(hooks_counts) >= NEW_TOKENS, hooks_counts  # today's path: every parameter once per step at least
    assert once_counts == [1] * len(once_counts), once_counts  # gathered once for the whole call

    # The hooks are back: a forward gathers as before, a training step runs, shards stay shards.
    ids = torch.tensor([[5, 17, 29, 41]])
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    loss = engine(ids).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    assert all(p.numel() == 0 for p in policy.parameters())
    after = make(synced_gpus=True, gather_whole_up_to=whole).generate(policy, prompts, params)
    assert [g.sampling_logprobs for g in after] != [g.sampling_logprobs for g in once]  # the stepped weights sample


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    try:
        _scenario(rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_generate_gathers_each_parameter_once_and_samples_as_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)
