"""Whole weights of a sharded policy (iq_lightning/sharded.py), for export and the vLLM push: two
CPU processes (gloo) shard the tiny model with FSDP2, FSDP1 or DeepSpeed ZeRO-3, and what is
gathered must be the unsharded model's state dict, name for name and bit for bit."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from conftest import has_module
from iq_lightning.config import LoraSpec, ModelSpec, TinySpec
from iq_lightning.models import apply_lora, build_tiny, export_policy, is_peft, plain_named_parameters
from iq_lightning.sharded import full_named_parameters, plain_name, ready_for_generate


def _tiny(lora: bool):
    model, tokenizer = build_tiny(TinySpec())
    if lora:  # seeded: every rank must start from the same adapter, as seed_everything ensures in a run
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = apply_lora(model, LoraSpec(enabled=True, r=4, alpha=8))
            for name, p in model.named_parameters():
                if "lora_B" in name:  # lora_B starts at zero; make the merge matter
                    p.normal_(0, 0.5)
    return model, tokenizer


def _plain_state(model) -> dict[str, torch.Tensor]:
    """What the sharded model must give back: the unsharded (LoRA-merged) state dict."""
    plain = copy.deepcopy(model).merge_and_unload() if is_peft(model) else model
    return {name: t.detach().clone() for name, t in plain.state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert type(got[name]) is torch.Tensor, name
        assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max().item())


def _check_gather_and_export(rank: int, model, tokenizer, want: dict[str, torch.Tensor], out: Path) -> None:
    # Consumed to the end before comparing: the gathered copies must outlive their gathers.
    _assert_same(dict(plain_named_parameters(model)), want)
    export_policy(model, tokenizer, out / f"rank{rank}", merge=True, is_writer=rank == 0)
    dist.barrier()
    if rank == 0:
        assert not (out / "rank1").exists()  # every rank gathered, one wrote
        final = out / "rank0" / ("merged" if is_peft(model) else "")
        _assert_same(AutoModelForCausalLM.from_pretrained(final).state_dict(), want)
        if is_peft(model):  # the adapter beside it, on a fresh base, merges to the same weights
            from peft import PeftModel

            adapter = PeftModel.from_pretrained(build_tiny(TinySpec())[0], out / "rank0")
            _assert_same(adapter.merge_and_unload().state_dict(), want)


def _fsdp2(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, tokenizer = _tiny(lora=False)
    want = _plain_state(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    _check_gather_and_export(rank, model, tokenizer, want, out)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded afterwards


def _fsdp1(rank: int, out: Path, lora: bool, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, tokenizer = _tiny(lora)
    want = _plain_state(model)
    sharded = FSDP(
        model,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=use_orig_params,
    )
    shards = sum(p.numel() for p in sharded.parameters())
    assert shards < sum(t.numel() for t in want.values()) * 0.75  # really sharded
    _check_gather_and_export(rank, sharded, tokenizer, want, out)
    assert sum(p.numel() for p in sharded.parameters()) == shards  # resharded afterwards


def _fsdp1_generate(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, tokenizer = _tiny(lora=False)
    reference = copy.deepcopy(model)
    sharded = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True)
    ids = torch.tensor([[5, 17, 29, 41, 53]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with ready_for_generate(sharded) as inner:
        got = inner.generate(ids, **kwargs)
    assert torch.equal(got, reference.generate(ids, **kwargs))
    with ready_for_generate(reference) as same:
        assert same is reference
    # The HF sampler, as a sharded run uses it: sampled tokens and log-probs as unsharded.
    from iq_lightning.samplers.base import SamplingParams
    from iq_lightning.samplers.hf import HFSampler

    sampler = HFSampler(batch_size=2, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, show_progress=False, synced_gpus=True)
    prompts, params = [[5, 17, 29], [7, 9, 11, 13]], SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)
    for got_g, want_g in zip(sampler.generate(sharded, prompts, params), sampler.generate(reference, prompts, params)):
        assert got_g.response_ids == want_g.response_ids
        assert got_g.sampling_logprobs == pytest.approx(want_g.sampling_logprobs, abs=1e-5)


def _fsdp1_unit_outside() -> None:
    # As Lightning's FSDPStrategy wraps the LightningModule with no wrap policy: the policy is a
    # slice of the LightningModule's unit, which the policy alone cannot gather.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    holder = torch.nn.Module()
    holder.policy, _ = _tiny(lora=False)
    FSDP(holder, device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.raises(RuntimeError, match="wraps this model from outside"):
        next(full_named_parameters(holder.policy))


def _deepspeed_partitioned(model):
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned: the local tensor is empty
    return model


def _deepspeed(rank: int, out: Path, lora: bool) -> None:
    model, tokenizer = _tiny(lora)
    want = _plain_state(model)
    _check_gather_and_export(rank, _deepspeed_partitioned(model), tokenizer, want, out)
    assert all(p.numel() == 0 for p in model.parameters())


def _deepspeed_tied(rank: int) -> None:
    # A tied LM head is the embedding's parameter: yielded once, under the embedding's name,
    # as named_parameters does (and as vLLM expects of a tied model).
    config = copy.deepcopy(_tiny(lora=False)[0].config)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert "lm_head.weight" not in want
    _assert_same(dict(full_named_parameters(_deepspeed_partitioned(model))), want)


def _deepspeed_all(rank: int, out: Path) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    _deepspeed(rank, out / "plain", lora=False)
    _deepspeed(rank, out / "lora", lora=True)
    _deepspeed_tied(rank)


def _loaded_from_rank0(rank: int, out: Path, kind: str) -> None:
    """A sharded skeleton filled from rank 0's whole model (the only rank that has one) holds
    exactly that model: gathered back bit for bit, the same logits, each rank about half of it.
    Untied (the tiny model) and with a tied LM head (SmolLM2's), which a skeleton must tie too."""
    from iq_lightning.config import StrategySpec
    from iq_lightning.models import skeleton
    from iq_lightning.strategies import FSDP, ZeRO3

    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    spec = ModelSpec(source="tiny", name_or_path="tiny")
    sharding = (ZeRO3 if kind == "deepspeed" else FSDP)(StrategySpec(name=kind, accelerator="cpu", devices=2, strategy=kind))
    for tied in (False, True):
        config = copy.deepcopy(_tiny(lora=False)[0].config)
        config.tie_word_embeddings = tied
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            whole = AutoModelForCausalLM.from_config(config)
        want = {n: p.detach().clone() for n, p in whole.named_parameters()}
        assert ("lm_head.weight" in want) != tied
        ids = torch.tensor([[5, 17, 29, 41, 53, 60, 61]])
        with torch.no_grad():
            want_logits = whole(input_ids=ids).logits
        model = sharding.materialize(lambda: skeleton(spec, whole.config), whole if rank == 0 else None, frozen_dtype=torch.float32)
        local = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() for p in model.parameters())
        total = sum(t.numel() for t in want.values())
        assert 0.45 * total <= local <= 0.55 * total, (local, total)
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, dict(whole.named_buffers())[plain_name(name)]), name
        _assert_same(dict(full_named_parameters(model)), want)
        model = sharding.prepare_frozen(model.eval())
        with torch.no_grad():
            for _ in range(3):  # DeepSpeed starts keeping weights for reuse once it has traced a pass
                got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want_logits, rtol=0, atol=1e-5)
        # After the forwards each rank holds its shards again, not whole weights kept for reuse.
        held = sum(p.numel() for p in model.parameters())
        assert held <= 0.55 * total, (held, total)


# One process pair per scenario (starting one costs most of a scenario's time).
SCENARIOS = {
    "fsdp2": _fsdp2,
    "fsdp1_flat_params": lambda rank, out: (_fsdp1(rank, out, lora=False, use_orig_params=False), _fsdp1_unit_outside()),
    "fsdp1_orig_params": lambda rank, out: (
        _fsdp1(rank, out / "plain", lora=False, use_orig_params=True),
        _fsdp1(rank, out / "lora", lora=True, use_orig_params=True),
    ),
    "deepspeed_zero3": _deepspeed_all,
    "fsdp1_generate": _fsdp1_generate,
    "fsdp1_loaded_from_rank0": lambda rank, out: _loaded_from_rank0(rank, out, "fsdp"),
    "deepspeed_loaded_from_rank0": lambda rank, out: _loaded_from_rank0(rank, out, "deepspeed"),
}


def _worker(rank: int, scenario: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        SCENARIOS[scenario](rank, Path(out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "scenario",
    [
        "fsdp2",
        "fsdp1_flat_params",
        "fsdp1_orig_params",
        "fsdp1_generate",
        "fsdp1_loaded_from_rank0",
        pytest.param("deepspeed_zero3", marks=pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")),
        pytest.param("deepspeed_loaded_from_rank0", marks=pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")),
    ],
)
def test_two_ranks_gather_the_unsharded_weights_and_export_them(scenario, tmp_path):
    mp.spawn(_worker, args=(scenario, _free_port(), str(tmp_path)), nprocs=2)


def test_a_plain_model_yields_its_own_parameters_without_copies():
    model, _ = _tiny(lora=False)
    got = list(full_named_parameters(model))
    assert [n for n, _ in got] == [n for n, _ in model.named_parameters()]
    assert all(t.data_ptr() == p.data_ptr() for (_, t), p in zip(got, model.parameters()))


def test_wrapper_segments_are_removed_from_names():
    name = "_orig_mod.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert plain_name(name) == "model.layers.0.mlp.up_proj.weight"


def test_decoder_layers_are_the_fsdp_units(tiny):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from iq_lightning.config import LoraSpec
    from iq_lightning.models import apply_lora, frozen_copy
    from iq_lightning.strategies import decoder_layer_classes

    model, _ = tiny
    assert decoder_layer_classes(model) == {LlamaDecoderLayer}
    assert decoder_layer_classes(apply_lora(frozen_copy(model).requires_grad_(True), LoraSpec(enabled=True))) == {LlamaDecoderLayer}
