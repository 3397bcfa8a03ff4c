"""What W&B (and the run directory's metrics/hparams.yaml) records about a run, so that the runs
of a sweep can be told apart, grouped and compared on a dashboard:

- training: the full resolved config plus flat keys to group by (alpha, principle, model_name,
  seed, ...), tags for the objective and the model, the sweep directory as the W&B group, and a
  table of each epoch's rollouts (`RunTracking`);
- evaluation: the judge and the evaluated training runs' W&B ids in the config and tags, and win
  rates, Elo ratings and the judge's quality as numbers a dashboard can chart (`eval_*`);
- `read_offline_run`: an offline run's records read back (tests, and checking before `wandb sync`).

Pure functions of the typed configs; nothing here reads Hydra's config or the environment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from iq_lightning.config import ModelSpec, RunConfig, as_plain
from iq_lightning.rollouts import Rollout, read_rollouts

WANDB_ID_FILE = "wandb_run_id"  # written by run.build_loggers in every W&B-logged run directory
ROLLOUT_COLUMNS = [
    "epoch", "prompt_id", "category", "prompt", "response", "length", "finished", "target_logprob_mean",
    "target_logprob_min", "ref_logprob_mean", "credit_sum", "credit_mean", "credit_min", "credit_max",
    "most_credited", "least_credited", "token_credits",
]
_TAG_LIMIT = 64  # W&B's longest tag
_GROUP_LIMIT = 128  # and group name


def model_name(model: ModelSpec) -> str:
    """A short, stable name of a model spec: a hub id as is, a local directory by its last parts."""
    if model.source == "tiny":
        return "tiny"
    name = str(model.name_or_path)
    path = Path(name)
    if path.is_absolute() or path.exists():
        parts = [p for p in path.parts if p not in ("/", "final", "merged")]
        return "/".join(parts[-2:]) or name
    return name


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def flat_config(run: RunConfig) -> dict[str, Any]:
    """The run's config for W&B and metrics/hparams.yaml: every training key at the top (alpha,
    beta, seed, epochs, samples_per_epoch, lr, ...), flat keys to group runs by (model_name,
    principle, placement, guide_kind, sampler_backend, temperature, ..., data_source, sweep),
    and the full resolved config of each part under its own name (model, data, guide, sampler,
    strategy, logger, ...), which W&B shows as model.name_or_path and so on."""
    full = as_plain(run)
    train = full.pop("train")
    full["objective_options"] = full.pop("objective")  # "objective" is the name, to group runs by
    g, s, d, st = run.guide, run.sampler, run.data, run.strategy
    flat = {
        **train,
        "objective": run.objective.name,
        "model_name": model_name(run.model),
        "model_source": run.model.source,
        "lora": run.model.lora.enabled,
        "guide_kind": g.kind,
        "principle": g.principle if g.kind == "principle" else None,
        "placement": g.placement if g.kind == "principle" else None,
        "guide_model": model_name(g.model) if g.model is not None else None,
        "sampler_backend": s.backend,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_new_tokens": s.max_new_tokens,
        "data_source": d.source,
        "data_path": d.path,
        "data_split": d.split,
        "data_limit": d.limit,
        "strategy_name": st.name,
        "devices": _plain(st.devices),
        "num_nodes": st.num_nodes,
        "sweep": sweep_group(run.run_dir),
        "run_dir": str(run.run_dir),
    }
    return {**flat, **full}


def _tag(text: str) -> str:
    return text if len(text) <= _TAG_LIMIT else text[: _TAG_LIMIT - 3] + "..."


def run_tags(run: RunConfig) -> list[str]:
    """Tags of a training run: the objective, model, guide, sampler and loss reduction."""
    tags = [
        f"objective:{run.objective.name}",
        f"model:{model_name(run.model)}",
        f"guide:{run.guide.kind}",
        f"sampler:{run.sampler.backend}",
        f"reduction:{run.train.reduction}",
    ]
    if run.model.lora.enabled:
        tags.append("lora")
    return [_tag(t) for t in tags]


def _sweep_name(sweep_dir: Path) -> str:
    sweep_dir = sweep_dir.resolve()
    try:
        name = str(sweep_dir.relative_to(Path.cwd().resolve()))
    except ValueError:
        name = str(sweep_dir)
    return name[-_GROUP_LIMIT:]


def sweep_group(run_dir: str | Path) -> str | None:
    """The W&B group of a run of a Hydra sweep (`-m`): its sweep directory (relative to the
    working directory when below it); None for a single run. Hydra writes multirun.yaml into
    the sweep directory before it starts the first run."""
    sweep_dir = Path(run_dir).resolve().parent
    return _sweep_name(sweep_dir) if (sweep_dir / "multirun.yaml").is_file() else None


def wandb_init_kwargs(run: RunConfig) -> dict[str, Any]:
    """Keyword arguments for the training run's WandbLogger (passed on to wandb.init)."""
    return {"tags": run_tags(run), "group": sweep_group(run.run_dir), "job_type": "train", "config": flat_config(run)}


# Rollouts


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).replace("\n", "\\n")


def rollout_row(rollout: Rollout, tokenizer, beta: float, token_limit: int = 200) -> list[Any]:
    """One row of ROLLOUT_COLUMNS: the sample, its per-token target log pi_hat and credit
    beta * (log pi_hat - log pi_ref) summarised, the tokens with the most and least credit, and
    every token with its credit ("token:+0.12 | ...", the first `token_limit` tokens)."""
    n = len(rollout.response_ids)
    credit = [beta * (t - r) for t, r in zip(rollout.target_logprobs, rollout.ref_logprobs)]
    tokens = [_token(tokenizer, i) for i in rollout.response_ids]
    order = sorted(range(n), key=lambda i: credit[i])
    ranked = lambda idx: " | ".join(f"{tokens[i]!r} {credit[i]:+.3f}" for i in idx)  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return [
        rollout.epoch,
        rollout.prompt_id,
        rollout.category,
        rollout.messages[-1]["content"] if rollout.messages else "",
        rollout.response_text,
        n,
        rollout.finished,
        mean(rollout.target_logprobs),
        min(rollout.target_logprobs, default=math.nan),
        mean(rollout.ref_logprobs),
        sum(credit),
        mean(credit),
        min(credit, default=math.nan),
        max(credit, default=math.nan),
        ranked(reversed(order[-3:])),
        ranked(order[:3]),
        " | ".join(f"{t}:{c:+.3f}" for t, c in list(zip(tokens, credit))[:token_limit]),
    ]


def rollouts_table(rollouts: Sequence[Rollout], tokenizer, beta: float, limit: int):
    """A wandb.Table of the first `limit` rollouts (ROLLOUT_COLUMNS)."""
    import wandb

    return wandb.Table(columns=ROLLOUT_COLUMNS, data=[rollout_row(r, tokenizer, beta) for r in rollouts[:limit]])


class RunTracking(Callback):
    """Logs the run's flat_config to every logger when fit starts (W&B config, and the CSV
    logger's metrics/hparams.yaml), and after every epoch a W&B table `rollouts` of that epoch's
    first `table_rows` samples (0: none)."""

    def __init__(self, run: RunConfig, rollout_path: Callable[[int], Path], tokenizer, table_rows: int):
        self.config = flat_config(run)
        self.beta = run.train.beta
        self.rollout_path, self.tokenizer, self.table_rows = rollout_path, tokenizer, table_rows

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
            logger.save()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.table_rows or not trainer.is_global_zero:
            return
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        path = self.rollout_path(trainer.current_epoch)
        if not wandb_loggers or not path.exists():
            return
        table = rollouts_table(read_rollouts(path), self.tokenizer, self.beta, self.table_rows)
        for logger in wandb_loggers:
            logger.experiment.log({"rollouts": table, "trainer/global_step": trainer.global_step})


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger (same name: callbacks find W&B loggers by it) that does not send a
    step twice. A run resumed after a kill -9 replays the steps after its last checkpoint; W&B
    already holds them (up to `resume_step`, the highest step the run logged, read from
    metrics.csv), so those below it are not sent again and `trainer/global_step` goes on from
    where the killed attempt stopped."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step
        # Lightning always passes `anonymous` (None unless asked), and wandb >= 0.22 warns on every
        # run that the setting has no effect: a warning the user can do nothing about.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None and self.resume_step is not None and step < self.resume_step:
            return
        super().log_metrics(metrics, step)


# Evaluation runs


def training_run_ids(contestants: Iterable[Any]) -> dict[str, str]:
    """contestant name -> W&B id of the training run it comes from (its run_dir's wandb_run_id),
    for the contestants that have one."""
    ids = {}
    for c in contestants:
        run_dir = getattr(c, "run_dir", None)
        if run_dir and (Path(run_dir) / WANDB_ID_FILE).is_file():
            ids[c.name] = (Path(run_dir) / WANDB_ID_FILE).read_text().strip()
    return ids


def judge_name(spec: Any) -> str:
    """The judge as one string: backend and model (likelihood with no model_path: the model group's)."""
    j = spec.judge
    if j.backend == "openai":
        return f"openai:{j.model}" + (f"@{j.base_url}" if j.base_url else "")
    return f"{j.backend}:{j.model_path or model_name(spec.model)}"


def eval_config(spec: Any, contestants: Sequence[Any]) -> dict[str, Any]:
    """The evaluation run's W&B config: flat keys (judge, reference, pairs, seed, alpha, beta,
    data_source, data_split, data_limit, the sampler's settings, the contestants and the
    training runs' W&B ids), then the full spec."""
    full = as_plain(spec)
    full.pop("contestants", None)
    runs = training_run_ids(contestants)
    return {
        "judge": judge_name(spec),
        "judge_backend": spec.judge.backend,
        "criteria": spec.judge.criteria or "helpful-harmless (default)",
        "reference": spec.reference,
        "pairs": spec.pairs,
        "seed": spec.seed,
        "alpha": spec.alpha,
        "beta": spec.beta,
        "model_name": model_name(spec.model),
        "data_source": spec.data.source,
        "data_split": spec.data.split,
        "data_limit": spec.data.limit,
        "temperature": spec.sampler.temperature,
        "max_new_tokens": spec.sampler.max_new_tokens,
        "sweep_dir": spec.sweep_dir,
        "contestants": {c.name: _plain({k: v for k, v in dataclasses.asdict(c).items() if v is not None and k != "name"}) for c in contestants},
        "training_runs": runs,
        "training_run_ids": sorted(set(runs.values())),
        "spec": full,
    }


def eval_tags(spec: Any, contestants: Sequence[Any]) -> list[str]:
    """evaluation, the judge, and one `train:<W&B id>` per evaluated training run (searchable)."""
    tags = ["evaluation", f"judge:{judge_name(spec)}"] + [f"train:{i}" for i in sorted(set(training_run_ids(contestants).values()))]
    return [_tag(t) for t in tags]


def eval_init_kwargs(spec: Any, contestants: Sequence[Any]) -> dict[str, Any]:
    """Keyword arguments for the evaluation's wandb.init: config, tags, job_type, and the sweep's
    group when it evaluates a sweep (the same group as the sweep's training runs)."""
    group = _sweep_name(Path(spec.sweep_dir)) if spec.sweep_dir else None
    return {"config": eval_config(spec, contestants), "tags": eval_tags(spec, contestants), "group": group, "job_type": "evaluation"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _key(name: str) -> str:
    return str(name).replace("/", "_")


RATE_METRICS = ("win_rate", "tie_rate", "lose_rate", "win_minus_lose", "win_low", "win_high", "lose_low", "lose_high", "wins", "ties", "losses", "invalid")
ELO_METRICS = ("elo", "low", "high", "std")


def eval_metrics(
    rate_rows: Sequence[Mapping[str, Any]],
    elo_rows: Sequence[Mapping[str, Any]] = (),
    judge_metrics: Mapping[str, Any] | None = None,
    reference: str | None = None,
) -> dict[str, float]:
    """Numbers a dashboard can chart: `<figure>/<a> vs <b>` per judged pair (win_rate, tie_rate,
    lose_rate, win_minus_lose, their 95% bounds and counts, from a's side), with `reference`
    also `vs_reference/<figure>/<name>` from each other contestant's side (one chart of every
    contestant against the baseline), `elo/<name>` (and elo_low, elo_high, elo_std), and the
    judge's quality figures under `judge/` (as judge_quality measures them)."""
    out: dict[str, float] = {}
    swap = {"win_rate": "lose_rate", "lose_rate": "win_rate", "tie_rate": "tie_rate"}
    for row in rate_rows:
        pair = f"{_key(row['a'])} vs {_key(row['b'])}"
        for figure in RATE_METRICS:
            value = _number(row.get(figure))
            if value is not None:
                out[f"{figure}/{pair}"] = value
        if reference is not None and reference in (row["a"], row["b"]) and row["a"] != row["b"]:
            other, flipped = (row["b"], True) if row["a"] == reference else (row["a"], False)
            for figure, source in swap.items():
                value = _number(row.get(source if flipped else figure))
                if value is not None:
                    out[f"vs_reference/{figure}/{_key(other)}"] = value
            value = _number(row.get("win_minus_lose"))
            if value is not None:
                out[f"vs_reference/win_minus_lose/{_key(other)}"] = -value if flipped else value
    for row in elo_rows:
        for figure in ELO_METRICS:
            value = _number(row.get(figure))
            if value is not None and value == value:
                out[f"{'elo' if figure == 'elo' else 'elo_' + figure}/{_key(row['contestant'])}"] = value
    for name, value in (judge_metrics or {}).items():
        number = _number(value)
        if number is not None:
            out[name if str(name).startswith("judge/") else f"judge/{name}"] = number
    return out


# Reading an offline run back


@dataclass
class OfflineRun:
    """What an offline W&B run recorded (its run-<id>.wandb file)."""

    id: str = ""
    name: str = ""  # the display name (train.py: the run's overrides)
    tags: list[str] = field(default_factory=list)
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def tables(self, key: str) -> list[dict]:
        """The tables logged under `key`, in order, each {columns, data}."""
        found = []
        for row in self.history:
            ref = row.get(key)
            if isinstance(ref, dict) and ref.get("_type") == "table-file" and self.path is not None:
                found.append(json.loads((self.path.parent / "files" / ref["path"]).read_text()))
        return found


_BLOCK, _HEADER = 32768, 7  # the LevelDB log format W&B writes: 32 KiB blocks, 7-byte record headers


def _records(data: bytes) -> Iterable[bytes]:
    pos, pending = _HEADER, b""  # the file starts with a 7-byte ":W&B" header
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _set(target: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    node = target
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(directory: str | Path, wait_s: float = 10.0) -> OfflineRun:
    """The newest offline W&B run under `directory` (a run directory, its wandb/ folder or one
    offline-run-* folder), read from its transaction log without uploading anything.

    W&B's writer may still be flushing for a moment after `finish()` returns: the log is read
    again until it holds the run's exit record, for at most `wait_s` seconds (a run that
    crashed has none, and is read as it is)."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(directory).glob("**/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {directory}")
    deadline = time.monotonic() + wait_s
    while True:
        records = [pb.Record.FromString(raw) for raw in _records(files[-1].read_bytes())]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    run = OfflineRun(path=files[-1])
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.tags, run.group, run.job_type = r.run_id, r.display_name, list(r.tags), r.run_group, r.job_type
            for item in r.config.update:
                _set(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                if item.key or item.nested_key:
                    _set(run.summary, item)
    run.config.pop("_wandb", None)
    return run
