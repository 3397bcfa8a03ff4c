"""Typed run configuration, built once from the Hydra config at the entry point and validated.

Every other module takes plain constructor arguments; nothing reads the Hydra config or the
environment on its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from iq_lightning.errors import ConfigError
from iq_lightning.numerics import MODES as NUMERICS
from iq_lightning.objective import REDUCTIONS


@dataclass(frozen=True)
class TinySpec:
    """A randomly initialised Llama built in-process (tests, smoke runs). head_dim 64 for vLLM CPU."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters via peft. With LoRA the guides and the reference are the policy's own base
    weights with the adapter disabled, so no second copy of the model is held."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    merge_on_export: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. source: 'pretrained' (hub id or local directory, optional
    gguf_file), 'package_gguf' (a GGUF file shipped inside the pip package `name_or_path`),
    or 'tiny'."""

    source: str = "pretrained"
    name_or_path: str = ""
    gguf_file: str | None = None
    # A local GGUF file is converted once into a plain directory here and loaded from it after
    # (gguf_cache.py: about 20 s less per process for SmolLM2); null: parse the GGUF every time.
    gguf_cache: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    tiny: TinySpec = field(default_factory=TinySpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    chat_template: str | None = None  # for tokenizers that ship none (Vicuna v1.5)
    # Sizes for the memory plan when config.json is not local (hub models on a machine that has
    # not downloaded them): hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
    # vocab_size, max_position_embeddings, tie_word_embeddings.
    architecture: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DataSpec:
    """Prompt source: 'bundled' (shipped with iq_lightning), 'hh_rlhf' (Anthropic/HH-RLHF prefixes),
    'beavertails' (BeaverTails-Evaluation, harmful queries by category) or 'local' (JSONL/Parquet at `path` with `prompt` or `messages`)."""

    source: str = "bundled"
    path: str | None = None
    split: str | None = "train"
    hh_subsets: tuple[str, ...] = ("helpful-base", "harmless-base")
    max_prompt_tokens: int = 512
    limit: int | None = None


@dataclass(frozen=True)
class PrincipleSpec:
    """One of several principles (guide.principles): its text and its weight alpha_k in
    pi_hat ∝ prod_k pi_w,k^alpha_k * pi_l^(1 - sum_k alpha_k)."""

    text: str = ""
    alpha: float = 1.0
    placement: str | None = None  # system | user; None: guide.placement


@dataclass(frozen=True)
class GuideSpec:
    """The winner guide pi_w. kind 'principle': the SFT model with `principle` inserted at
    `placement` (system|user), weighted by the top-level alpha; or `principles`, several, each
    with its own alpha (one guide pass each; `principle` then null). kind 'aligned_model': a
    separate aligned `model` given the plain prompt. pi_l is always the frozen initial policy
    given the plain prompt."""

    kind: str = "principle"
    principle: str | None = None
    # A text file holding the principle (no shell or Hydra quoting); replaces `principle` when the
    # RunConfig is built, so everything after (the restart check, W&B) sees the text itself.
    principle_file: str | None = None
    principles: tuple[PrincipleSpec, ...] | None = None
    placement: str = "system"
    model: ModelSpec | None = None
    batch_size: int = 16
    # None: under ZeRO-3 / FSDP the guides are sharded over the ranks like the policy, otherwise
    # on the policy's device; a device name (e.g. "cpu") keeps them whole there instead.
    device: str | None = None
    dtype: str | None = None  # None: the policy's dtype; bfloat16 on GPUs (frozen: no master weights)


@dataclass(frozen=True)
class SamplerSpec:
    """On-policy generation. temperature 0 means greedy."""

    backend: str = "hf"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodingSpec:
    """How answers are decoded for generate.py and the evaluation (never for training rollouts).
    num_beams 1: the sampler's own decoding (temperature, top_p). num_beams > 1: beam search over
    the model's own likelihood with transformers' generate (sampler=hf only): r-to-Q* (Rafailov et
    al. 2024) reads a policy trained on token-level rewards as a Q-function, so this searches its
    implicit reward. Finished beams are ranked by sum log p / length**length_penalty; early_stopping
    is transformers' (true: stop once num_beams answers have finished; false: once no running beam
    can beat them, by its heuristic; "never": only when none can, the slowest)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1


@dataclass(frozen=True)
class TrainSpec:
    alpha: float = 1.5
    # Epochs over which alpha rises linearly from 1.0 (pi_hat = pi_w) to `alpha` (objective.scheduled_alpha); 0: off.
    alpha_warmup_epochs: int = 0
    beta: float = 0.1
    seed: int = 0
    epochs: int = 3
    samples_per_epoch: int = 32
    lr: float = 1e-4
    micro_batch_size: int = 4
    accumulate_grad_batches: int = 1
    passes_per_epoch: int = 1
    reduction: str = "token_mean"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # Optimizer steps with a non-finite loss, guide target or gradient norm that are skipped
    # (their gradients discarded, counted as train/nonfinite_skipped) before the run stops.
    nonfinite_skips: int = 0
    precision: str = "32-true"
    save_final: bool = True
    keep_checkpoint: bool = True  # False: delete checkpoints/ once final/ is written (the run cannot be extended then)
    save_epoch_policies: bool = False  # policies/epoch_NNN after every epoch (reward curves, Fig. 6)
    credit_maps_per_epoch: int = 2  # credit/epoch_NNN/*.html heat maps of the first samples (Fig. 8)
    rollout_table_rows: int = 16  # rollouts per epoch in the W&B table `rollouts` (0: none)
    dry_run: bool = False  # print the resolved config and the per-device memory plan, load nothing
    # native: the CPU's fastest kernels (bitwise reproducible on this kind of CPU); portable: the
    # AVX2 kernels on every x86-64 CPU, so runs reproduce across machines (numerics.py).
    numerics: str = "native"


@dataclass(frozen=True)
class ValSpec:
    """Held-out validation (validation.py): the policy answers `prompts` held-out prompts without
    the principle, before training and after every `every_n_epochs` epochs (0: off)."""

    every_n_epochs: int = 1
    prompts: int = 16
    split: str = "test"  # the prompt source's held-out split
    max_new_tokens: int | None = None  # None: sampler.max_new_tokens
    temperature: float = 0.0  # 0: greedy; apart from sampler.temperature, which draws training's rollouts
    top_p: float = 1.0  # apart from sampler.top_p likewise
    batch_size: int = 16
    table_rows: int = 16  # rows of the per-epoch W&B validation table
    check: Mapping[str, Any] | None = None  # principle check {kind: auto|language|regex|none, language, pattern, flags}
    cache: bool = True  # keep the teacher's and the untrained policy's answers for later runs (validation_cache.py)
    cache_dir: str = "~/.cache/iq-lightning/answers"


@dataclass(frozen=True)
class ObjectiveSpec:
    """The training objective (objectives.py): inverse_q, or a baseline beside it."""

    name: str = "inverse_q"
    divergence: str = "reverse_kl"  # distill: reverse_kl | forward_kl | jsd
    # Each objective reads it its own way, with its own default in its conf/objective/NAME.yaml:
    # distill with jsd: the mixture weight of the teacher, in [0, 1] (TRL's GKD convention; 0.5);
    # dpo: the KL coefficient of DPO's implicit reward, > 0 (0.1).
    beta: float = 0.5
    # ppo (conf/objective/ppo.yaml documents each): per-token KL penalty (None: 1 / alpha),
    # clip ranges, value-loss weight, GAE's gamma and lambda, the value head's lr (None: lr).
    kl_coef: float | None = None
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    value_lr: float | None = None
    # ppo: a sequence-classification reward model (local directory or hub id, num_labels=1) that
    # scores x + y; None: the guides' contrastive reward.
    reward_model: str | None = None
    # dpo: where the preference pairs come from. "dataset": the data's own chosen/rejected replies
    # (HH-RLHF, local rows with chosen/rejected); "principle": RLCD, pi_w's answer chosen and pi_l's
    # rejected, sampled once. None: dataset for sources whose rows all carry pairs
    # (PAIRED_SOURCES: the paper's DPO on HH-RLHF), principle otherwise; resolved at build.
    pairs: str | None = None
    # inverse_q, open choices of docs/method.md (conf/objective/inverse_q.yaml; objective.py):
    # penalty on the residuals log pi_hat(y_t) - log pi_theta(y_t), squared (the paper's) or huber
    # (quadratic within huber_delta nats, linear beyond); target_clip: None, or each target at
    # most that many nats from log pi_ref(y_t).
    penalty: str = "squared"
    huber_delta: float = 1.0
    target_clip: float | None = None


@dataclass(frozen=True)
class StrategySpec:
    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    device_memory_gib: float | None = None  # None: the GPU's memory, or on CPU the host RAM per process


@dataclass(frozen=True)
class LoggerSpec:
    kind: str = "wandb"
    project: str = "iq-lightning"
    name: str | None = None
    mode: str = "offline"
    entity: str | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    data: DataSpec
    guide: GuideSpec
    sampler: SamplerSpec
    train: TrainSpec
    strategy: StrategySpec
    logger: LoggerSpec
    run_dir: Path
    val: ValSpec = field(default_factory=ValSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)


SAMPLER_BACKENDS = ("hf", "vllm")
MODEL_SOURCES = ("pretrained", "package_gguf", "tiny")
DATA_SOURCES = ("bundled", "hh_rlhf", "beavertails", "local")
PAIRED_SOURCES = ("hh_rlhf",)  # every row is a chosen/rejected pair (local rows may carry one)
UNPAIRED_SOURCES = ("bundled", "beavertails")  # prompts only
GUIDE_KINDS = ("principle", "aligned_model")
PLACEMENTS = ("system", "user")
LOGGERS = ("wandb", "csv", "none")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")


def build_spec(cls: type, node: Any, where: str) -> Any:
    """Construct dataclass `cls` from a mapping, naming the offending key on a mistake."""
    if node is None:
        return cls()
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {node!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields) - {"_target_"})
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in node.items():
        if name not in fields:
            continue
        if name == "tiny":
            value = build_spec(TinySpec, value, f"{where}.tiny")
        elif name == "lora":
            value = build_spec(LoraSpec, value, f"{where}.lora")
        elif name == "target_modules":
            value = tuple(value)
        elif name == "model" and cls is GuideSpec:
            value = None if value is None else build_spec(ModelSpec, value, f"{where}.model")
        elif name == "hh_subsets":
            value = tuple(value)
        elif name == "principles":
            if value is not None and (isinstance(value, (str, Mapping)) or not hasattr(value, "__iter__")):
                raise ConfigError(f"{where}.principles must be a list of {{text: ..., alpha: ...}}, got {value!r}")
            value = None if value is None else tuple(build_spec(PrincipleSpec, item, f"{where}.principles[{i}]") for i, item in enumerate(value))
        elif name == "decoding":
            value = build_spec(DecodingSpec, value, f"{where}.decoding")
        elif name == "options":
            value = dict(value or {})
        elif name in ("architecture", "check"):  # optional mappings
            value = None if value is None else dict(value)
        kwargs[name] = value
    return cls(**kwargs)


_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainSpec)}


def build_run_config(cfg: DictConfig | Mapping[str, Any], run_dir: str | Path) -> RunConfig:
    """Hydra config -> validated RunConfig. Raises ConfigError with one clear line.

    The objective's own options are not checked here: config.py knows no objective.
    objectives.resolve_and_check fills in the objective's defaults and checks its options, where
    objectives are built (run.train calls it first)."""
    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # interpolation errors are user mistakes too
            raise ConfigError(f"cannot resolve the config: {exc}") from None
    else:
        plain = dict(cfg)
    top = {k: v for k, v in plain.items() if k in _TRAIN_KEYS}
    groups = {"model", "data", "guide", "sampler", "strategy", "logger", "val", "objective"}
    stray = sorted(set(plain) - _TRAIN_KEYS - groups - {"hydra"})
    if stray:
        raise ConfigError(f"unknown top-level key {stray[0]!r} (known: {', '.join(sorted(_TRAIN_KEYS | groups))})")
    try:
        run = RunConfig(
            model=build_spec(ModelSpec, plain.get("model"), "model"),
            data=build_spec(DataSpec, plain.get("data"), "data"),
            guide=build_spec(GuideSpec, plain.get("guide"), "guide"),
            sampler=build_spec(SamplerSpec, plain.get("sampler"), "sampler"),
            train=build_spec(TrainSpec, top, "train"),
            strategy=build_spec(StrategySpec, plain.get("strategy"), "strategy"),
            logger=build_spec(LoggerSpec, plain.get("logger"), "logger"),
            run_dir=Path(run_dir),
            val=build_spec(ValSpec, plain.get("val"), "val"),
            objective=build_spec(ObjectiveSpec, plain.get("objective"), "objective"),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    run = resolve_principle_file(run)
    validate(run)
    return run


def resolve_principle_file(run: RunConfig) -> RunConfig:
    """`run` with guide.principle read from guide.principle_file (whitespace around it dropped)."""
    return dataclasses.replace(run, guide=principle_from_file(run.guide))


def principle_from_file(guide: GuideSpec) -> GuideSpec:
    """`guide` with its principle read from guide.principle_file, if one is named (train.py and
    evaluate.py alike)."""
    path = guide.principle_file
    if path is None:
        return guide
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"guide.principle_file={path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    _check(bool(text), f"guide.principle_file={path} is empty")
    return dataclasses.replace(guide, principle=text, principle_file=None)


def as_plain(spec: Any) -> dict:
    """A config dataclass (a RunConfig, an evaluation spec) as plain JSON values: paths and other
    objects as strings. What the restart check, W&B and `describe` record."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    _check(value >= minimum, f"{key} must be >= {minimum}, got {value}")
    return value


def validate(run: RunConfig) -> None:
    """Checks that need no model or file access beyond existence of the data file."""
    t = run.train
    _check(_number(t.alpha, "alpha") >= 0, f"alpha must be >= 0 (the paper uses 1.0-1.5), got {t.alpha}")
    _number(t.beta, "beta")
    _check(_number(t.lr, "lr") > 0, f"lr must be > 0, got {t.lr}")
    _integer(t.epochs, "epochs", 1)
    _integer(t.samples_per_epoch, "samples_per_epoch", 1)
    _integer(t.micro_batch_size, "micro_batch_size", 1)
    _integer(t.accumulate_grad_batches, "accumulate_grad_batches", 1)
    _integer(t.passes_per_epoch, "passes_per_epoch", 1)
    _integer(t.alpha_warmup_epochs, "alpha_warmup_epochs", 0)
    _integer(t.seed, "seed", 0)
    _integer(t.nonfinite_skips, "nonfinite_skips", 0)
    _integer(t.credit_maps_per_epoch, "credit_maps_per_epoch", 0)
    _integer(t.rollout_table_rows, "rollout_table_rows", 0)
    _check(str(t.precision) in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _check(t.numerics in NUMERICS, f"numerics must be one of {', '.join(NUMERICS)}, got {t.numerics!r}")
    _check(t.reduction in REDUCTIONS, f"reduction must be one of {', '.join(REDUCTIONS)}, got {t.reduction!r}")

    validate_objective(run.objective)

    m = run.model
    _check(m.source in MODEL_SOURCES, f"model.source must be one of {', '.join(MODEL_SOURCES)}, got {m.source!r}")
    _check(m.source == "tiny" or bool(m.name_or_path), "model.name_or_path is empty")
    if m.lora.enabled:
        _integer(m.lora.r, "model.lora.r", 1)
        _check(0 <= _number(m.lora.dropout, "model.lora.dropout") < 1, "model.lora.dropout must be in [0, 1)")
        _check(bool(m.lora.target_modules), "model.lora.target_modules is empty")

    d = run.data
    _check(d.source in DATA_SOURCES, f"data.source must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
    if d.source == "local":
        _check(bool(d.path), "data=local needs data.path=/path/to/prompts.jsonl (or .parquet)")
        _check(Path(d.path).is_file(), f"data.path={d.path}: no such file")
    _integer(d.max_prompt_tokens, "data.max_prompt_tokens", 1)

    g = run.guide
    _check(g.kind in GUIDE_KINDS, f"guide.kind must be one of {', '.join(GUIDE_KINDS)}, got {g.kind!r}")
    _check(g.placement in PLACEMENTS, f"guide.placement must be system or user, got {g.placement!r}")
    if g.principles is not None:
        validate_principles(run)
    elif g.kind == "principle":
        _check(bool(g.principle and str(g.principle).strip()), "guide=principle needs a non-empty guide.principle")
    else:
        _check(g.model is not None, "guide=aligned_model needs guide.model (the aligned model pi_w)")
    _integer(g.batch_size, "guide.batch_size", 1)

    validate_sampler(run.sampler)

    _check(run.logger.kind in LOGGERS, f"logger must be one of {', '.join(LOGGERS)}, got {run.logger.kind!r}")

    v = run.val
    _integer(v.every_n_epochs, "val.every_n_epochs", 0)
    if v.every_n_epochs:
        _integer(v.prompts, "val.prompts", 1)
        _integer(v.batch_size, "val.batch_size", 1)
        _integer(v.table_rows, "val.table_rows", 0)
        _check(_number(v.temperature, "val.temperature") >= 0, f"val.temperature must be >= 0, got {v.temperature}")
        _check(0 < _number(v.top_p, "val.top_p") <= 1, f"val.top_p must be in (0, 1], got {v.top_p}")
        if v.max_new_tokens is not None:
            _integer(v.max_new_tokens, "val.max_new_tokens", 1)


def principle_weights(guide: GuideSpec, alpha: float) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The texts and weights alpha_k of a guide=principle run's principles: guide.principles, or
    the one guide.principle with the top-level `alpha`."""
    if guide.principles is not None:
        return tuple(p.text for p in guide.principles), tuple(p.alpha for p in guide.principles)
    return (guide.principle,), (alpha,)


def principle_placements(guide: GuideSpec) -> tuple[str, ...]:
    """Where each principle goes in x_w (principle_weights' order): its own placement, else
    guide.placement. Small models follow some principles from the system message, others only
    prepended to the user turn."""
    if guide.principles is None:
        return (guide.placement,)
    return tuple(p.placement or guide.placement for p in guide.principles)


def validate_principles(run: RunConfig) -> None:
    g = run.guide
    _check(g.kind == "principle", f"guide.principles needs guide.kind=principle, got {g.kind!r}")
    _check(
        g.principle is None,
        "guide.principle and guide.principles are both set: use guide=principles (or guide.principle=null) with guide.principles",
    )
    _check(len(g.principles) > 0, "guide.principles is empty: give at least one {text: ..., alpha: ...}")
    for i, p in enumerate(g.principles):
        _check(isinstance(p.text, str) and bool(p.text.strip()), f"guide.principles[{i}].text is empty")
        _check(_number(p.alpha, f"guide.principles[{i}].alpha") >= 0, f"guide.principles[{i}].alpha must be >= 0, got {p.alpha}")
        _check(p.placement in (None, *PLACEMENTS), f"guide.principles[{i}].placement must be system or user, got {p.placement!r}")
    _check(
        len(g.principles) == 1 or run.objective.name == "inverse_q",
        f"several guide.principles train objective=inverse_q only (objective={run.objective.name} reads one teacher)",
    )


def validate_objective(o: ObjectiveSpec) -> None:
    """The objective group's numbers are numbers; which objective, divergence and values are
    accepted is the objectives' own check (objectives.resolve_and_check)."""
    _number(o.beta, "objective.beta")
    for key in ("kl_coef", "clip_range", "value_clip_range", "vf_coef", "gamma", "lam", "value_lr"):
        if getattr(o, key) is not None:
            _number(getattr(o, key), f"objective.{key}")


def validate_sampler(s: SamplerSpec) -> SamplerSpec:
    _check(s.backend in SAMPLER_BACKENDS, f"sampler.backend must be one of {', '.join(SAMPLER_BACKENDS)}, got {s.backend!r}")
    _integer(s.max_new_tokens, "sampler.max_new_tokens", 1)
    _check(_number(s.temperature, "sampler.temperature") >= 0, f"sampler.temperature must be >= 0, got {s.temperature}")
    top_p = _number(s.top_p, "sampler.top_p")
    _check(0 < top_p <= 1, f"sampler.top_p must be in (0, 1], got {s.top_p}")
    _integer(s.batch_size, "sampler.batch_size", 1)
    return s


def validate_decoding(d: DecodingSpec, backend: str, where: str = "decoding") -> DecodingSpec:
    """`where`: the config path of the block (decoding, contestants.NAME.decoding)."""
    _integer(d.num_beams, f"{where}.num_beams", 1)
    _number(d.length_penalty, f"{where}.length_penalty")
    _check(
        isinstance(d.early_stopping, bool) or d.early_stopping == "never",
        f"{where}.early_stopping must be true, false or never, got {d.early_stopping!r}",
    )
    _check(
        not (d.beam_search and backend != "hf"),
        f"{where}.num_beams={d.num_beams}: beam search runs with transformers' generate only; add sampler=hf "
        f"(sampler={backend} decodes with num_beams=1)",
    )
    return d
