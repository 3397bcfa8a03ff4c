"""The per-device memory plan: exact sizes, how strategies and LoRA change it, the one-line refusal,
and a plan for every model config without weights or network."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONF, compose
from iq_lightning.config import ModelSpec, TinySpec, build_run_config
from iq_lightning.errors import ConfigError
from iq_lightning.memory_plan import (
    CHECKPOINT,
    GIB,
    TINY_VOCAB_SIZE,
    TRAINING,
    Architecture,
    MemoryPlan,
    PlanItem,
    architecture_of,
    device_capacity,
    layer_activation_elements,
    numerics,
    plan_memory,
    world_size_of,
)

SMOLLM2_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct, its model card's count
SMALL = ["epochs=1", "samples_per_epoch=8", "logger=none"]


def run_config(tmp_path, overrides):
    return build_run_config(compose(overrides), tmp_path)


def meta_parameters(config) -> int:
    """Parameters of the transformers model built from `config` on the meta device (no memory);
    a tied LM head is one parameter shared with the embeddings, counted once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def llama_config(arch: Architecture):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        head_dim=arch.dim_per_head,
    )


def test_tiny_parameters_match_the_built_model(tiny):
    model, tokenizer = tiny
    arch = architecture_of(ModelSpec(source="tiny", name_or_path="tiny", tiny=TinySpec()))
    assert arch.vocab_size == TINY_VOCAB_SIZE == len(tokenizer)
    assert arch.parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head_dim", [None, 48])
def test_gqa_parameters_match_transformers(tied, head_dim):
    arch = Architecture(
        hidden_size=256, intermediate_size=688, num_layers=3, num_heads=8, num_kv_heads=2, vocab_size=1000,
        max_position_embeddings=512, tie_word_embeddings=tied, head_dim=head_dim,
    )
    assert arch.parameters == meta_parameters(llama_config(arch))


def test_smollm2_parameters_from_its_architecture_block(tmp_path):
    arch = architecture_of(run_config(tmp_path, ["model=smollm2"]).model)
    assert arch.parameters == SMOLLM2_PARAMETERS
    assert meta_parameters(llama_config(arch)) == SMOLLM2_PARAMETERS


def test_local_config_json_is_read_and_wins(tmp_path):
    config = llama_config(Architecture(512, 1024, 2, 8, 4, 3000, 1024, False))
    config.save_pretrained(tmp_path)
    spec = ModelSpec(source="pretrained", name_or_path=str(tmp_path), architecture={"hidden_size": 1})
    arch = architecture_of(spec)
    assert (arch.hidden_size, arch.num_kv_heads, arch.vocab_size) == (512, 4, 3000)
    assert arch.parameters == meta_parameters(config)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == arch.num_layers


def test_unknown_sizes_name_model_architecture():
    spec = ModelSpec(source="pretrained", name_or_path="no-such-org/no-such-model-xyz")
    with pytest.raises(ConfigError, match="model.architecture"):
        architecture_of(spec)
    with pytest.raises(ConfigError, match="model.architecture is missing intermediate_size"):
        architecture_of(ModelSpec(source="pretrained", name_or_path="x/y", architecture={"hidden_size": 8}))


def test_activation_formula_matches_autograd():
    """layer_activation_elements against what autograd really saves in one more Llama layer
    (SDPA, float32), counted with saved_tensors_hooks: the formula tracks transformers' code."""
    from transformers import LlamaForCausalLM

    from iq_lightning.forward import pack, response_logprobs

    arch = Architecture(128, 320, 1, 4, 2, 300, 256, False)
    batch = pack([list(range(3, 40))] * 2, [list(range(5, 15))] * 2, 0, share_prefix=False)

    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(Architecture(**{**arch.__dict__, "num_layers": layers}))).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            response_logprobs(model, batch)
        return sum(seen.values())

    tokens = batch["input_ids"].numel()
    per_token = (saved_bytes(2) - saved_bytes(1)) / tokens / 4
    assert abs(per_token - layer_activation_elements(arch)) <= 4


def _item(plan: MemoryPlan, prefix: str) -> PlanItem:
    return next(i for i in plan.items if i.name.startswith(prefix))


def test_zero3_divides_policy_and_optimizer_by_world_size(tmp_path):
    """float32 (32-true): ZeRO-3's weights and gradients per device are DDP's / world (its weights
    plus the RMSNorms, under DeepSpeed's persistence threshold, whole on every rank); its optimizer
    state is DDP's / world plus the float32 gradients flattened for the step (4 of every 8 bytes)."""
    common = ["model=smollm2", "precision=32-true", *SMALL]
    ddp = plan_memory(run_config(tmp_path, [*common, "strategy=ddp", "strategy.devices=8"]), 8, None, "gpu")
    zero3 = plan_memory(run_config(tmp_path, [*common, "strategy=deepspeed_zero3", "strategy.devices=8"]), 8, None, "gpu")
    norms = (2 * 30 + 1) * 576 * 4
    assert _item(zero3, "policy weights").bytes == pytest.approx(_item(ddp, "policy weights").bytes / 8 + norms, abs=64)
    assert _item(zero3, "policy gradients").bytes == pytest.approx(_item(ddp, "policy gradients").bytes / 8, abs=64)
    assert _item(zero3, "optimizer state").bytes == pytest.approx(_item(ddp, "optimizer state").bytes * 1.5 / 8, abs=64)
    # bf16-mixed: DeepSpeed stores half-precision weights and keeps float32 master weights.
    bf16 = run_config(tmp_path, ["model=smollm2", "precision=bf16-mixed", "strategy=deepspeed_zero3", *SMALL])
    assert (numerics(bf16).param, numerics(bf16).master) == (2, 4)


def test_lora_drops_the_guide_copy_and_most_optimizer_state(tmp_path):
    full = plan_memory(run_config(tmp_path, ["model=smollm2", *SMALL]), 1, None, "cpu")
    lora = plan_memory(run_config(tmp_path, ["model=smollm2", "model.lora.enabled=true", *SMALL]), 1, None, "cpu")
    assert _item(full, "guides").bytes == SMOLLM2_PARAMETERS * 4
    assert _item(lora, "guide").bytes == 0
    assert _item(lora, "optimizer state").bytes < 0.05 * _item(full, "optimizer state").bytes
    assert lora.total < full.total


def test_guide_dtype_and_host_guides(tmp_path):
    common = ["model=smollm2", *SMALL, "strategy=deepspeed_zero3", "strategy.devices=2"]
    sharded = plan_memory(run_config(tmp_path, common), 2, None, "gpu")
    half = plan_memory(run_config(tmp_path, [*common, "guide.dtype=bfloat16"]), 2, None, "gpu")
    host = plan_memory(run_config(tmp_path, [*common, "guide.device=cpu"]), 2, None, "gpu")
    assert _item(half, "guides").bytes * 2 == _item(sharded, "guides").bytes
    assert _item(host, "guides").bytes == 0 and "host memory" in _item(host, "guides").name


def test_phases_do_not_add_up(tmp_path):
    plan = plan_memory(run_config(tmp_path, ["model=smollm2", *SMALL, "data.max_prompt_tokens=64"]), 1, None, "cpu")
    persistent = sum(i.bytes for i in plan.items if CHECKPOINT in i.phases and TRAINING in i.phases)
    transient = {p: sum(i.bytes for i in plan.items if i.phases == (p,)) for p in (TRAINING, CHECKPOINT)}
    assert plan.total == persistent + max(transient.values())
    assert plan.total < sum(i.bytes for i in plan.items)
    assert f"the total is the largest phase, {plan.peak_phase()}" in plan.render()


def test_rank_zero_alone_writes_the_checkpoint(tmp_path):
    plan = plan_memory(run_config(tmp_path, ["model=smollm2", *SMALL, "strategy=ddp", "strategy.devices=2", "data.max_prompt_tokens=64"]), 2, None, "cpu")
    assert plan.peak_phase(0) == CHECKPOINT
    assert plan.total_for_rank(1) < plan.total_for_rank(0) == plan.total


def test_check_refuses_in_one_line_with_the_fix(tmp_path):
    run = run_config(tmp_path, ["model=zephyr", "strategy=ddp", "strategy.devices=8"])
    plan = plan_memory(run, 8, 80 * GIB, "gpu")
    assert not plan.fits
    with pytest.raises(ConfigError) as info:
        plan.check()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("memory plan: ") and "exceeds 80.0 GiB" in message
    assert f"largest item: {plan.largest.name}" in message and message.endswith(f"try {plan.largest.fix}")
    assert plan.largest.name.startswith("optimizer state") and plan.largest.fix == "model.lora.enabled=true"
    plan_memory(run_config(tmp_path, ["model=tiny", *SMALL]), 1, 8 * GIB, "cpu").check()  # fits: no error


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["strategy=deepspeed_zero3", "strategy.devices=8"],
        ["strategy=fsdp", "strategy.devices=4", "guide=aligned_model", "sampler=vllm"],
        ["strategy=ddp", "strategy.devices=2", "strategy.accelerator=cpu", "model.lora.enabled=true", "model.gradient_checkpointing=true"],
    ],
)
def test_every_model_config_has_a_plan_without_network(tmp_path, monkeypatch, model, extra):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the memory plan touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    run = run_config(tmp_path, [f"model={model}", "logger=none", *extra])
    plan = plan_memory(run, world_size_of(run.strategy), None, run.strategy.accelerator)
    assert plan.total > 0 and plan.fits
    text = plan.render()
    assert "total" in text and "GiB" in text


# experiments/paper_baselines.sh: PPO's value head keeps it off the sharded strategies, so DDP + LoRA.
PAPER_PPO = ["strategy=ddp", "strategy.accelerator=gpu", "model.lora.enabled=true", "model.dtype=bfloat16"]


@pytest.mark.parametrize("objective", ["inverse_q", "distill", "sft", "dpo", "ppo"])
def test_paper_scale_zephyr_fits_eight_80gb_gpus(tmp_path, objective):
    strategy = PAPER_PPO if objective == "ppo" else ["strategy=deepspeed_zero3"]
    run = run_config(tmp_path, ["model=zephyr", *strategy, "strategy.devices=8", f"objective={objective}"])
    if objective == "dpo":
        assert run.objective.pairs == "dataset"  # the paper's DPO: HH-RLHF's own pairs
    assert world_size_of(run.strategy) == 8
    plan = plan_memory(run, 8, 80 * GIB, "gpu")
    assert plan.fits and 10 * GIB < plan.total < 80 * GIB


def test_world_size_and_capacity():
    from iq_lightning.config import StrategySpec

    assert world_size_of(StrategySpec(accelerator="cpu", devices="auto")) == 1
    assert world_size_of(StrategySpec(accelerator="cpu", devices=2, num_nodes=3)) == 6
    assert world_size_of(StrategySpec(accelerator="gpu", devices=[0, 1])) == 2
    assert device_capacity("cpu", 1, 12.5) == int(12.5 * GIB)
    host = device_capacity("cpu", 1, None)
    assert host > GIB and device_capacity("cpu", 2, None) == host // 2


def test_distill_counts_the_teacher_in_the_training_phase(tmp_path):
    """Guides run in distill's training step: both guides' logits (4 x 33 x 49152 float32 each),
    pi_hat in float32, and the divergence's chunks, on top of inverse_q's training phase."""
    base = ["model=smollm2", *SMALL, "data.max_prompt_tokens=64", "sampler.max_new_tokens=32"]
    plain = plan_memory(run_config(tmp_path, base), 1, None, "cpu")
    distill = plan_memory(run_config(tmp_path, base + ["objective=distill"]), 1, None, "cpu")
    added = distill.phase_bytes(TRAINING) - plain.phase_bytes(TRAINING)
    rows, vocab = 33, 49152
    assert added == 2 * 4 * rows * vocab * 4 + 4 * rows * vocab * 4 + 2 * 6 * rows * vocab * 4


def test_several_principles_count_one_guide_pass_each(tmp_path):
    """guide.principles with K = 2: scoring keeps 3 (B, T+1, V) logits alive instead of 2 (and one
    more float32 chunk), validation one more guide's logits; x_w is the longest principle's."""
    base = ["model=smollm2", *SMALL, "data.max_prompt_tokens=64", "sampler.max_new_tokens=32", "guide.principle=Answer in one sentence."]
    two = ["guide=principles", 'guide.principles=[{text: "Answer in one sentence.", alpha: 0.8}, {text: "Answer in one sentence.", alpha: 0.6}]']
    one = plan_memory(run_config(tmp_path, base), 1, None, "cpu")
    several = plan_memory(run_config(tmp_path, [*base[:-1], *two]), 1, None, "cpu")
    scoring_one, scoring_two = _item(one, "scoring"), _item(several, "scoring")
    assert scoring_one.name.startswith("scoring: two guide passes") and scoring_two.name.startswith("scoring: 3 guide passes")
    rows, vocab, batch, chunk = 33, 49152, 8, 256
    assert scoring_two.bytes - scoring_one.bytes == batch * rows * vocab * 4 + min(chunk, batch * rows) * vocab * 4
    assert _item(several, "validation: answers").bytes - _item(one, "validation: answers").bytes == 16 * rows * vocab * 4  # val.batch_size 16
