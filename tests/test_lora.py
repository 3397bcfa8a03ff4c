"""LoRA: only adapters train, and the adapter-disabled base stands in for the frozen guides."""

import copy

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import compose
from iq_lightning.config import LoraSpec, TinySpec, build_run_config
from iq_lightning.guides import PrincipleGuide
from iq_lightning.models import AdapterDisabled, apply_lora, build_tiny, frozen_copy, plain_named_parameters
from iq_lightning.run import train
from test_guides import PRINCIPLE, _prompts, _responses


def _lora_policy_with_active_adapter():
    base, tokenizer = build_tiny(TinySpec())
    reference = frozen_copy(base)
    policy = apply_lora(base, LoraSpec(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # lora_B starts at zero; make the adapter matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy, reference, tokenizer


def test_adapter_disabled_targets_equal_a_separate_frozen_base():
    policy, reference, tokenizer = _lora_policy_with_active_adapter()
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    shared = PrincipleGuide(AdapterDisabled(lambda: policy), tokenizer, PRINCIPLE, "system", alpha=1.4, show_progress=False)
    copied = PrincipleGuide(reference, tokenizer, PRINCIPLE, "system", alpha=1.4, show_progress=False)
    adapted = PrincipleGuide(policy, tokenizer, PRINCIPLE, "system", alpha=1.4, show_progress=False)
    for a, b, c in zip(shared.score(prompts, responses), copied.score(prompts, responses), adapted.score(prompts, responses)):
        torch.testing.assert_close(torch.tensor(a.target_logprobs), torch.tensor(b.target_logprobs), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(torch.tensor(a.ref_logprobs), torch.tensor(b.ref_logprobs), atol=1e-6, rtol=1e-6)
        assert max(abs(x - y) for x, y in zip(a.ref_logprobs, c.ref_logprobs)) > 1e-3  # the adapter is live
    policy.train()
    AdapterDisabled(lambda: policy)(input_ids=torch.tensor([[1, 2, 3]]))
    assert policy.training


def test_plain_named_parameters_merge_the_adapter():
    policy, _, _ = _lora_policy_with_active_adapter()
    merged = copy.deepcopy(policy).merge_and_unload()
    pushed = {n: p.clone() for n, p in plain_named_parameters(policy)}  # views: valid while iterating
    assert set(pushed) == {n for n, _ in merged.named_parameters()}
    for name, p in merged.named_parameters():
        torch.testing.assert_close(pushed[name], p.detach())
    assert not any("lora_" in n for n in pushed)
    # Merging for the push leaves the policy's own weights unmerged.
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_lora_run_trains_only_adapters_and_exports_adapter_and_merged(tmp_path):
    cfg = compose(["model=tiny", "model.lora.enabled=true", "model.lora.r=4", "epochs=1", "samples_per_epoch=8",
                   "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "lr=1e-3", "logger=none"])
    result = train(build_run_config(cfg, tmp_path), show_progress=False)
    initial = build_tiny(TinySpec())[0].state_dict()
    lora_changed, base_changed = 0, 0
    for name, p in result.module.policy.named_parameters():
        if "lora_" in name:
            lora_changed += int(p.requires_grad and "lora_B" in name and p.abs().sum() > 0)
        else:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            base_changed += int(not torch.equal(p.detach(), initial[plain]))
            assert not p.requires_grad
    assert lora_changed > 0 and base_changed == 0
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    adapter = PeftModel.from_pretrained(build_tiny(TinySpec())[0], final)  # the adapter on a fresh base
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        trained = result.module.policy(input_ids=x).logits
        torch.testing.assert_close(merged(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)


def test_pushing_lora_weights_never_touches_the_shared_base_in_bf16():
    policy, _, _ = _lora_policy_with_active_adapter()
    policy = policy.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    for _ in range(3):
        for _name, _tensor in plain_named_parameters(policy):
            pass
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n


def test_generate_uses_the_merged_model_of_a_lora_run(tmp_path):
    import pytest

    from iq_lightning.config import ModelSpec
    from iq_lightning.errors import ConfigError
    from iq_lightning.generation import model_spec_for

    fallback = ModelSpec(source="tiny", dtype="bfloat16")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="merge_on_export"):
        model_spec_for(str(tmp_path), None, fallback)
    (tmp_path / "final" / "merged").mkdir()
    (tmp_path / "final" / "merged" / "config.json").write_text("{}")
    spec = model_spec_for(str(tmp_path), None, fallback)
    assert spec.name_or_path == str(tmp_path / "final" / "merged") and spec.dtype == "bfloat16"
