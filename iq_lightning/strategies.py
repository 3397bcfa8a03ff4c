"""Everything that depends on the training strategy, in one place.

- Which Lightning strategy runs (`Sharding.trainer_strategy`), including CPU debugging modes of
  DeepSpeed ZeRO-3 and FSDP: Lightning implements both for CUDA only, but their machinery runs on
  CPU processes over gloo once the few CUDA-only checks are lifted (`CPUDeepSpeedStrategy`).
- How the policy and the frozen guides are laid out over the ranks. Replicated strategies (one
  process, DDP) give every rank whole models. Under ZeRO-3 and FSDP each rank holds a shard: the
  whole weights are loaded once, on rank 0, and poured into an empty sharded skeleton one group at
  a time (`sharded.load_from_rank0`), so no other rank ever holds a whole copy. The guides are
  sharded the same way (ZeRO-3: a DeepSpeed inference engine over partitioned parameters, as TRL
  prepares its reference models; FSDP: FSDP units of their own), unless `guide.device` asks for
  whole guides on one device.

Ranks of a sharded model must make the same forward calls in the same order (each call gathers
shards collectively): callers ask `Sharding.sharded` and then skip per-batch shortcuts whose call
count depends on the data (the shared prompt prefix).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from iq_lightning.config import StrategySpec
from iq_lightning.errors import ConfigError

ModelBuilder = Callable[[], nn.Module]


def _cpu(spec: StrategySpec) -> bool:
    return spec.accelerator == "cpu" or not torch.cuda.is_available()


class Sharding(ABC):
    """How one strategy materialises the policy and the frozen guides on each rank."""

    sharded: bool = False
    # Whether `discard_gradients` can make a coming optimizer step change nothing (nonfinite.py).
    discards_gradients: bool = True

    def __init__(self, spec: StrategySpec, precision: str = "32-true"):
        self.spec = spec
        # train.precision (the Trainer's too, which the strategy's plugins must agree with)
        self.precision = "32-true" if str(precision) == "32" else str(precision)

    @abstractmethod
    def trainer_strategy(self, micro_batch_size: int):
        """The `strategy` argument of lightning.Trainer."""

    def trainer_plugins(self) -> list:
        """The `plugins` argument of lightning.Trainer."""
        return []

    def loads_whole_weights(self, rank: int) -> bool:
        """Whether this rank loads the whole weights that the shards are filled from."""
        return True

    def materialize(self, skeleton: ModelBuilder, source: nn.Module | None, frozen_dtype: torch.dtype | None = None) -> nn.Module:
        """A sharded model built by `skeleton` and filled from rank 0's whole `source` (None on
        the other ranks). The policy (frozen_dtype None) is built in LightningModule.configure_model,
        inside the strategy's own context; a frozen guide in setup, outside it."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole models")

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A sharded frozen guide, ready for forward passes."""
        return model

    def clip_gradients(self, trained: nn.Module, max_norm: float) -> bool:
        """Clip `trained`'s gradients by their global norm where Lightning's own clipping cannot;
        False: leave it to Lightning."""
        return False

    # --- non-finite checks (nonfinite.py): each rank looks at what it holds, the flags are then
    # reduced over the ranks, so only the local pieces are needed here, never a gather.

    def local_gradients(self, trained: nn.Module) -> list[torch.Tensor]:
        """The gradients of `trained` this rank holds between backward and the optimizer step:
        whole (and already averaged) under DDP; under FSDP (use_orig_params) each parameter's
        .grad is this rank's piece of it."""
        return [p.grad for p in trained.parameters() if p.grad is not None]

    def local_parameters(self, trained: nn.Module) -> list[torch.Tensor]:
        """The trainable parameter values this rank holds (FSDP: its shards, outside forward)."""
        return [p.detach() for p in trained.parameters() if p.requires_grad]

    def discard_gradients(self, trained: nn.Module) -> None:
        """Drop the gradients of the coming optimizer step so that it changes nothing. torch
        optimizers skip a parameter whose .grad is None (AdamW: no update, no moment decay, no
        step count), so the skipped step leaves weights and optimizer state as they were."""
        for p in trained.parameters():
            p.grad = None


class Replicated(Sharding):
    """One process, or DDP: whole models on every rank."""

    def trainer_strategy(self, micro_batch_size: int):
        return self.spec.strategy

    def trainer_plugins(self) -> list:
        # Rank zero writes the whole state into one file: stream it there (checkpoint_io.py).
        # The sharded strategies write each rank's shard with their own code.
        from iq_lightning.checkpoint_io import StreamingCheckpointIO

        return [StreamingCheckpointIO()]


class ZeRO3(Sharding):
    """DeepSpeed ZeRO stage 3: parameters, gradients and optimizer state partitioned over ranks."""

    sharded = True
    # The engine's step reads its own gradient partitions, and Lightning's DeepSpeed plugin
    # always calls it: a non-finite step cannot be skipped from here, only refused.
    discards_gradients = False

    def trainer_strategy(self, micro_batch_size: int):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"strategy={self.spec.name} needs deepspeed: bash scripts/install.sh --deepspeed (or pip install -e .[deepspeed])")
        # DeepSpeed clips by the global norm itself (Lightning passes gradient_clip_val on); the
        # module's clipping hook, overridden for FSDP, leaves it alone here.
        warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
        if _cpu(self.spec):
            # DeepSpeed picks its accelerator once, when first imported (rank 1 inherits this).
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            strategy = _cpu_deepspeed_strategy()(stage=3, precision_plugin=batch_keeping_deepspeed_precision(self.precision))
        else:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            strategy = DeepSpeedStrategy(stage=3, precision_plugin=batch_keeping_deepspeed_precision(self.precision))
        # Otherwise Lightning reads it off the train dataloader while setting up, which here
        # would sample an epoch before the policy exists.
        strategy.config["train_micro_batch_size_per_gpu"] = micro_batch_size
        return strategy

    def loads_whole_weights(self, rank: int) -> bool:
        return rank == 0

    def materialize(self, skeleton, source, frozen_dtype=None):
        import deepspeed
        from transformers.initialization import no_init_weights

        from iq_lightning.sharded import load_from_rank0

        # Every parameter is partitioned as its module is built (deepspeed.zero.Init: Lightning's
        # own around configure_model for the policy; one in the guide's dtype for a guide).
        # Initialisation is skipped: it would write into empty partitions, and the weights come
        # from rank 0 anyway.
        context = nullcontext() if frozen_dtype is None else deepspeed.zero.Init(config_dict_or_path=_zero3_inference_config(frozen_dtype))
        with no_init_weights(), context:
            model = skeleton()
        load_from_rank0(model, source)
        return model

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        import deepspeed

        # An inference engine registers the hooks that gather each module's partitions for its
        # forward (TRL's prepare_deepspeed does the same for reference models).
        engine, *_ = deepspeed.initialize(model=model, config=_zero3_inference_config(next(model.parameters()).dtype))
        engine.eval()
        return engine.module

    def local_gradients(self, trained: nn.Module) -> list[torch.Tensor]:
        # .grad is None under ZeRO-3: each rank's gradient partition lives in DeepSpeed's
        # optimizer, readable between backward and step through its public "local" API.
        from deepspeed.utils import safe_get_local_grad

        grads = (safe_get_local_grad(p) for p in trained.parameters() if p.requires_grad)
        return [g for g in grads if g is not None]

    def local_parameters(self, trained: nn.Module) -> list[torch.Tensor]:
        # The parameters themselves are empty placeholders outside forward; ds_tensor is this
        # rank's partition of the values.
        return [getattr(p, "ds_tensor", p).detach() for p in trained.parameters() if p.requires_grad]

    def discard_gradients(self, trained: nn.Module) -> None:
        raise NotImplementedError("ZeRO-3 steps cannot be skipped (discards_gradients is False)")


def batch_keeping_deepspeed_precision(precision: str):
    """Lightning's DeepSpeed precision plugin, except that the batch reaches training_step as it
    was collated. Lightning's `DeepSpeedPrecision.convert_input` casts every floating-point
    tensor of the batch to the precision's dtype (bf16 under bf16-mixed): the float32 targets
    log pi_hat, the reference log-probs, PPO's advantages would arrive rounded to 8 bits of
    mantissa (0.0156 nats at |log p| in [2, 4)), the very errors forward.py's float32 head exists
    to avoid. The batch's only model inputs are integer token ids, which no cast touches, so
    nothing needs the cast; FSDP's and DDP's plugins make none either."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    class BatchKeepingDeepSpeedPrecision(DeepSpeedPrecision):
        def convert_input(self, data):
            return data

    return BatchKeepingDeepSpeedPrecision(precision)


def _zero3_inference_config(dtype: torch.dtype) -> dict:
    # A frozen guide only runs forward, so nothing needs to stay gathered between its modules.
    # DeepSpeed keeps whole on every rank any tensor under the persistence threshold (default
    # 1e5 elements: every tensor of the tiny test model) and keeps gathered weights for reuse;
    # tests/test_sharded.py checks each rank holds about half of the guide after forwards (it
    # fails with the default threshold; the reuse setting alone it does not distinguish).
    # Measured on SmolLM2 (ZeRO-3, 2 ranks, per-rank peak RSS): 4.34/4.24 GiB with these
    # settings, 4.40/4.34 with DeepSpeed's defaults, 4.38/4.42 with a whole guide per rank.
    # Small there because the peak is the training step; at 7B the guide is the bulk.
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                              "stage3_param_persistence_threshold": 10_000},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


class FSDP(Sharding):
    """FSDP (torch's FullyShardedDataParallel, as Lightning's FSDPStrategy runs it): the policy and
    each of its decoder layers are units of their own, wrapped here rather than by the strategy,
    so the policy is a unit by itself (export and weight pushes gather it unit by unit,
    sharded.py) and can be built on the meta device. Checkpoints are sharded (one file per rank)."""

    sharded = True

    def trainer_strategy(self, micro_batch_size: int):
        from lightning.pytorch.strategies import FSDPStrategy

        # A subclass instance passes Lightning's "FSDP needs a GPU" check; torch's FSDP itself
        # runs on CPU processes over gloo.
        strategy_cls = type("CPUFSDPStrategy", (FSDPStrategy,), {}) if _cpu(self.spec) else FSDPStrategy
        return strategy_cls(state_dict_type="sharded")

    def loads_whole_weights(self, rank: int) -> bool:
        return rank == 0

    def materialize(self, skeleton, source, frozen_dtype=None):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from iq_lightning.sharded import load_from_rank0

        # On the meta device (no memory); FSDP materialises and shards one unit at a time.
        with torch.device("meta"):
            model = skeleton()
        device = torch.device("cpu") if _cpu(self.spec) else torch.device("cuda", torch.cuda.current_device())
        wrapped = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({type(model), *decoder_layer_classes(model)}),
            param_init_fn=_TiedMaterializer(device),
            device_id=device,
            use_orig_params=True,
            mixed_precision=self.mixed_precision() if frozen_dtype is None else None,
        )
        load_from_rank0(wrapped, source)
        return wrapped

    def mixed_precision(self):
        """torch FSDP's MixedPrecision of the policy under train.precision: Lightning's own
        (FSDPPrecision.mixed_precision_config: bf16-mixed gathers, reduces and keeps buffers in
        bfloat16, the sharded float32 parameters stay the optimizer's), which Lightning applies
        only to a model it wraps itself; None at 32-true (nothing to cast). A frozen guide is
        built in its own dtype (guide.dtype) and gathered as it is."""
        if self.precision in ("32-true", "32", "64-true"):
            return None
        from dataclasses import replace

        from lightning.pytorch.plugins.precision import FSDPPrecision

        # Every unit casts its float inputs: generate runs outside Lightning's autocast, with the
        # root unit's weights (embeddings, final norm, head) summoned whole in float32
        # (sharded.ready_for_generate), and the decoder layers gathered in half precision would
        # otherwise receive float32 hidden states.
        return replace(FSDPPrecision(self.precision).mixed_precision_config, cast_forward_inputs=True)

    def clip_gradients(self, trained: nn.Module, max_norm: float) -> bool:
        # Lightning's FSDP precision plugin refuses norm clipping. The policy is the outermost
        # unit (Lightning leaves a model it finds already wrapped alone), and computes the norm
        # over every rank's shards itself.
        trained.clip_grad_norm_(max_norm)
        return True


class _TiedMaterializer:
    """FSDP's param_init_fn: give a module's meta tensors real (uninitialised) storage, keeping
    parameters shared between modules shared. `Module.to_empty` would give a tied LM head a
    storage of its own, apart from the embedding it is tied to. Values come from rank 0 later."""

    def __init__(self, device: torch.device):
        self.device = device
        self.made: dict[int, nn.Parameter] = {}

    def __call__(self, module: nn.Module) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                if id(param) not in self.made:
                    self.made[id(param)] = nn.Parameter(torch.empty_like(param, device=self.device), param.requires_grad)
                module._parameters[name] = self.made[id(param)]
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=self.device)


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The model's repeated blocks (transformers' `_no_split_modules`): FSDP's units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return {type(m) for m in base.modules() if type(m).__name__ in names}


def _cpu_deepspeed_strategy():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
    from lightning.fabric.utilities.seed import reset_seed

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed ZeRO on CPU processes (gloo), for debugging a ZeRO-3 run before booking GPUs:
        three CUDA-only assumptions of Lightning's strategy lifted, nothing else changed."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # (1) skips "DeepSpeed needs a CUDA accelerator"

        def setup_distributed(self) -> None:
            # (2) skips the device-index check (CPU devices have no index)
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", self.local_rank)  # (3) DeepSpeed reads the index as the local rank

    return CPUDeepSpeedStrategy


SHARDINGS: dict[str, type[Sharding]] = {"deepspeed": ZeRO3, "fsdp": FSDP}


def refuse_host_guides(spec: StrategySpec, guide_device: str | None) -> None:
    """guide.device=cpu beside a policy sharded over GPUs: every rank would load the whole
    policy, copy it as pi_l, load an aligned pi_w too, and score on the CPU, about 60-70 GB of
    host RAM per rank at 7B and hours per epoch. The sharded guides are what fits (the memory
    plan counts them). On CPU processes (strategy.accelerator=cpu, debugging) it stays allowed."""
    gpu = spec.accelerator in ("gpu", "cuda") or (spec.accelerator == "auto" and torch.cuda.is_available())
    sharded = any(spec.strategy.startswith(prefix) for prefix in SHARDINGS)
    if gpu and sharded and guide_device is not None and str(guide_device).startswith("cpu"):
        raise ConfigError(
            f"guide.device={guide_device} under strategy={spec.name} on GPUs would hold whole guides in every rank's "
            "host RAM and score on the CPU: leave guide.device unset (the guides are sharded over the GPUs like the policy)"
        )


def sharding_for(spec: StrategySpec, precision: str = "32-true") -> Sharding:
    """The Sharding of a strategy config under `precision` (train.precision, which the Trainer
    gets too), refusing early what this machine cannot run."""
    if spec.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"strategy={spec.name} asks for accelerator={spec.accelerator} but no CUDA GPU is visible "
            "(strategy.accelerator=cpu runs it on CPU processes, for debugging)"
        )
    if spec.strategy.startswith("deepspeed") and spec.strategy not in ("deepspeed", "deepspeed_stage_3"):
        raise ConfigError(f"strategy.strategy={spec.strategy}: only ZeRO stage 3 (deepspeed_stage_3) is supported")
    for prefix, cls in SHARDINGS.items():
        if spec.strategy.startswith(prefix):
            return cls(spec, precision)
    return Replicated(spec, precision)


def trainer_kwargs(spec: StrategySpec, sharding: Sharding, micro_batch_size: int) -> dict:
    """lightning.Trainer arguments of the strategy config (`options` are passed as they are)."""
    return {
        "accelerator": spec.accelerator,
        "devices": spec.devices,
        "num_nodes": spec.num_nodes,
        "strategy": sharding.trainer_strategy(micro_batch_size),
        "plugins": sharding.trainer_plugins(),
        **dict(spec.options),
    }
