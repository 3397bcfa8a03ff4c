"""The per-device memory plan: exact sizes, how strategies and LoRA change it, the one-line refusal,
and a plan for every model config without weights or network."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONF, compose
from iq_lightning.config import ModelSpec, TinySpec
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
from iq_lightning.run import configure

SMOLLM2_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct, its model card's count
SMALL = ["epochs=1", "samples_per_epoch=8", "logger=none"]


def run_config(tmp_path, overrides):
    return configure(compose(overrides), tmp_path)


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


def _saved_bytes_per_token(arch: Architecture, batch, dtype: torch.dtype, float32_logits: bool = True) -> float:
    """Bytes autograd saves per token for one more Llama layer (SDPA), weights in `dtype`."""
    from transformers import LlamaForCausalLM

    from iq_lightning.forward import response_logprobs

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(Architecture(**{**arch.__dict__, "num_layers": layers}))).train().to(dtype)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            response_logprobs(model, batch, float32_logits=float32_logits)
        return sum(seen.values())

    return (saved(2) - saved(1)) / batch["input_ids"].numel()


def test_activation_formula_matches_autograd():
    """layer_activation_elements against what autograd really saves in one more Llama layer
    (SDPA, float32), counted with saved_tensors_hooks: the formula tracks transformers' code."""
    from iq_lightning.forward import pack

    arch = Architecture(128, 320, 1, 4, 2, 300, 256, False)
    batch = pack([list(range(3, 40))] * 2, [list(range(5, 15))] * 2, 0, share_prefix=False)
    per_token = _saved_bytes_per_token(arch, batch, torch.float32, float32_logits=False) / 4
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
    assert f"largest item: {plan.largest.name}" in message and message.endswith(f"try {plan.fitting_fix()}")
    assert plan.largest.name.startswith("optimizer state") and plan.fitting_fix().startswith("model.lora.enabled=true")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_half_precision_activations_match_autograd(dtype):
    """What ZeRO-3's bf16 weights and a micro-batch of unequal rows add to the float32 fit:
    RMSNorm's float32 copies and keys/values expanded to every head (the padding mask turns off
    SDPA's grouped-query path), re-counted with saved_tensors_hooks."""
    from iq_lightning.forward import pack
    from iq_lightning.memory_plan import layer_activation_extras

    arch = Architecture(128, 320, 1, 8, 2, 300, 256, False)
    padded = pack([list(range(3, 40)), list(range(3, 30))], [list(range(5, 15)), list(range(5, 9))], 0, share_prefix=False)
    assert not bool(padded["attention_mask"].all())
    element = 2 if dtype == torch.bfloat16 else 4
    measured = _saved_bytes_per_token(arch, padded, dtype)
    fitted = layer_activation_elements(arch) * element
    planned = fitted + sum(layer_activation_extras(arch, element))
    assert abs(measured - planned) <= 0.03 * measured, (measured, planned)
    assert measured - fitted > 0.08 * measured  # the float32 fit alone misses them


def test_zero3_bf16_plan_counts_the_half_precision_items_exactly(tmp_path):
    """Zephyr-7B, ZeRO-3, bf16-mixed, 8 GPUs: each new item against its own computation."""
    run = run_config(tmp_path, ["model=zephyr", "strategy=deepspeed_zero3", "strategy.devices=8", "model.gradient_checkpointing=false"])
    plan = plan_memory(run, 8, 80 * GIB, "gpu")
    tokens, layers, h, vocab = 2 * 2048, 33, 4096, 32000
    assert _item(plan, "training: RMSNorm float32").bytes == tokens * layers * 2 * h * 2
    assert _item(plan, "training: keys/values expanded to 32 heads").bytes == tokens * layers * 2 * (4096 - 1024) * 2
    assert _item(plan, "training: float32 LM-head weight copy").bytes == 2 * vocab * h * 4
    assert _item(plan, "training: float32 response logits").bytes == 2 * 2 * 1025 * vocab * 4 + 2 * 1025 * vocab * 4
    assert _item(plan, "runtime: NCCL").bytes == GIB
    training = sum(i.bytes for i in plan.items if TRAINING in i.phases)
    assert plan.phase_bytes(TRAINING) == int(training * 1.10)  # the allocator's fragmentation share
    text = plan.render()
    assert "10% for the allocator's fragmentation" in text and "headroom" in text
    # Vicuna is multi-head: nothing to expand. Float32 weights without autocast: no head copy.
    vicuna = plan_memory(run_config(tmp_path, ["model=vicuna7b", "strategy=deepspeed_zero3", "strategy.devices=8"]), 8, None, "gpu")
    assert not [i for i in vicuna.items if "expanded" in i.name]
    fp32 = plan_memory(run_config(tmp_path, ["model=zephyr", "strategy=deepspeed_zero3", "strategy.devices=8", "precision=32-true"]), 8, None, "gpu")
    assert not [i for i in fp32.items if "RMSNorm" in i.name or "LM-head weight copy" in i.name]


@pytest.mark.parametrize("precision, element", [("bf16-mixed", 2), ("32-true", 4)])
def test_fsdp_gathered_weights_follow_the_precision_setting(tmp_path, precision, element):
    """strategies.FSDP gathers the policy in the precision setting's dtype (tests/test_strategies.py
    checks the gathered dtype on 2 processes) and the guides in guide.dtype."""
    run = run_config(tmp_path, ["model=zephyr", "strategy=fsdp", "strategy.devices=8", f"precision={precision}"])
    plan = plan_memory(run, 8, None, "gpu")
    layer = architecture_of(run.model).layer_parameters
    assert _item(plan, "FSDP gathered policy weights").bytes == 2 * layer * element
    assert _item(plan, "FSDP gathered guide weights").bytes == 2 * layer * 2  # the paper's guide.dtype=bfloat16


# What experiments/paper_*.sh run (their ZeRO-3 lines; PPO's DDP + LoRA line is tested above).
PAPER_RUNS = [
    ["model=zephyr"], ["model=zephyr", "guide=aligned_model"], ["model=zephyr", "objective=distill", "alpha=1"],
    ["model=zephyr", "objective=sft"], ["model=zephyr", "objective=dpo", "objective.pairs=dataset"],
    ["model=zephyr_beta"], ["model=vicuna7b"], ["model=vicuna13b"],
]
H100_80GB = int(79.2 * GIB)  # what torch reports for an 80 GB A100/H100


@pytest.mark.parametrize("overrides", PAPER_RUNS, ids=lambda o: " ".join(o))
def test_paper_configs_fit_an_80gb_gpu_with_a_tenth_to_spare(tmp_path, overrides):
    run = run_config(tmp_path, [*overrides, "strategy=deepspeed_zero3", "strategy.devices=8"])
    plan = plan_memory(run, 8, H100_80GB, "gpu")
    assert plan.fits and plan.headroom_bytes >= 0.10 * H100_80GB, plan.render()
    # ... with the vLLM engine resident too (its default share, 0.3 of the GPU)
    if "model=vicuna13b" not in overrides:  # 26 GB of bf16 weights: sleep mode and a larger share (README)
        vllm = plan_memory(run_config(tmp_path, [*overrides, "strategy=deepspeed_zero3", "strategy.devices=8", "sampler=vllm"]), 8, H100_80GB, "gpu")
        assert vllm.fits and vllm.headroom_bytes >= 0.10 * H100_80GB, vllm.render()


def _overrides_of_the_fix(message: str) -> list[str]:
    return message.split("; try ", 1)[1].split()


def test_the_suggested_fix_is_searched_to_fit(tmp_path):
    """Issue: vicuna13b at sampler.batch_size=64 without gradient checkpointing stopped at 142.6
    GiB suggesting sampler.batch_size=31, which still did not fit. The suggestion must fit."""
    base = ["model=vicuna13b", "strategy=deepspeed_zero3", "strategy.devices=8", "sampler.batch_size=64", "model.gradient_checkpointing=false"]
    plan = plan_memory(run_config(tmp_path, base), 8, 80 * GIB, "gpu")
    with pytest.raises(ConfigError) as info:
        plan.check()
    fix = _overrides_of_the_fix(str(info.value))
    assert fix and all("=" in f for f in fix), fix
    fixed = plan_memory(run_config(tmp_path, [*base, *fix]), 8, 80 * GIB, "gpu")  # as typed on the command line
    assert fixed.fits, (fix, fixed.render())
    # A single knob: the largest batch that fits, not a halving.
    single = plan_memory(run_config(tmp_path, ["model=vicuna7b", "strategy=deepspeed_zero3", "strategy.devices=8", "sampler.batch_size=64"]), 8, 80 * GIB, "gpu")
    (one,) = _overrides_of_the_fix(str(pytest.raises(ConfigError, single.check).value))
    key, value = one.split("=")
    assert key == "sampler.batch_size"
    assert plan_memory(run_config(tmp_path, ["model=vicuna7b", "strategy=deepspeed_zero3", "strategy.devices=8", one]), 8, 80 * GIB, "gpu").fits
    assert not plan_memory(run_config(tmp_path, ["model=vicuna7b", "strategy=deepspeed_zero3", "strategy.devices=8", f"sampler.batch_size={int(value) + 1}"]), 8, 80 * GIB, "gpu").fits


def test_a_fix_on_a_training_setting_is_spelled_as_the_command_line_takes_it(tmp_path):
    """micro_batch_size is train.yaml's top-level key (RunConfig's train.micro_batch_size)."""
    base = ["model=zephyr", "strategy=deepspeed_zero3", "strategy.devices=8", "micro_batch_size=64"]
    plan = plan_memory(run_config(tmp_path, base), 8, 80 * GIB, "gpu")
    assert not plan.fits
    fix = plan.fitting_fix()
    assert fix == "micro_batch_size=31", fix  # the largest that fits (32 does not)
    assert plan_memory(run_config(tmp_path, [*base, *fix.split()]), 8, 80 * GIB, "gpu").fits


def test_an_unknown_device_says_which_gpu_sizes_fit(tmp_path):
    plan = plan_memory(run_config(tmp_path, ["model=vicuna13b", "strategy=deepspeed_zero3", "strategy.devices=8"]), 8, None, "gpu")
    spare = plan.fits_on()
    assert [name for name, left in spare.items() if left >= 0] == ["80 GB", "141 GB"]
    assert spare["80 GB"] == plan_memory(plan.run, 8, int(79.2 * GIB), "gpu").headroom_bytes
    text = plan.render()
    assert "(device memory unknown)" in text
    assert (
        f"on GPUs of 40 GB: does not fit, {-spare['40 GB'] / GIB:.1f} GiB short, 80 GB: fits, {spare['80 GB'] / GIB:.1f} GiB to spare, "
        f"141 GB: fits, {spare['141 GB'] / GIB:.1f} GiB to spare; strategy.device_memory_gib=80" in text
    )


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


def test_an_unsized_plan_of_devices_auto_without_a_gpu_says_it_planned_one_process(tmp_path, monkeypatch):
    """`python train.py model=zephyr strategy=deepspeed_zero3 dry_run=true` (the README's paper command)
    on a machine without GPUs planned 1 process for devices=auto and said the 7B run fits no GPU,
    not even 141 GB, without saying why."""
    from iq_lightning.memory_plan import world_size_of

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    run = run_config(tmp_path, ["model=zephyr", "strategy=deepspeed_zero3"])
    world = world_size_of(run.strategy)
    assert world == 1
    text = plan_memory(run, world, None, "gpu").render()
    assert "strategy.devices=auto and no GPU visible here: planned for 1 process; give the count, e.g. strategy.devices=8" in text
    sized = plan_memory(run_config(tmp_path, ["model=zephyr", "strategy=deepspeed_zero3", "strategy.devices=8"]), 8, None, "gpu").render()
    assert "no GPU visible here" not in sized
