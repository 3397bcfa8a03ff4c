"""Frozen answers, decoded once for every run that would decode them again: validation's, and
the evaluation's contestants'.

The teacher (pi_w: the base given the principle, or the aligned model) and the untrained policy
(epoch -1) answer the held-out prompts the same way in every run of a given model, principle,
prompts and decoding: an alpha sweep, a resumed or extended run and a rerun would each decode
them anew. Decoding is what costs. The figures are not kept: KL(answerer || pi_hat) depends on
alpha, and it comes from the same guide forward pass over the answers as KL to and NLL under
pi_w, so validation recomputes all of them from the kept answers with the code that measures
fresh ones, and a cached validation's figures are bitwise those of a computed one.

An entry is a directory named by the SHA-256 of everything that decides the answers (`key`): the
answering model's weights identity, the exact prompt token ids it answers (the principle, its
placement and the chat template are in them), the decoding (max_new_tokens, temperature, top_p,
the seed where sampling, batch size, EOS and pad ids, the decoder) and what decides the arithmetic
(precision, strategy, the device: GPU and CUDA or the CPU's kernels, torch and transformers
versions). It is written under a
temporary name and renamed when complete (files.published_directory, as the GGUF cache is), so a
kill mid-write is never read and two ranks or two sweep members writing one key at once end with
one complete copy. The code that decides an answer is in the key too (CODE: the samplers, the
model loading with the tiny model's initialisation, the prompts' encoding and the bundled data, by
content), so an upgrade never reuses answers an older version decoded; bump FORMAT for anything
else that changes them.

evaluate.py keeps its contestants' answers here too (evaluation/answers.py), keyed by its own
generation key's material (weights, principle, data, sampling, seed) and the same context, so two
evaluations in different out_dirs decode the Prompting and SFT baselines once between them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from iq_lightning.files import published_directory, write_jsonl_atomic, write_text_atomic
from iq_lightning.numerics import identity as cpu_identity

log = logging.getLogger(__name__)

FORMAT = 1
COMPLETE = "answers.complete"
ANSWERS = "answers.jsonl"
DECIDED_BY = "decided_by.json"  # what the key hashes, for a human wondering why two runs missed


PACKAGE = Path(__file__).resolve().parent
CODE_FILES = ("samplers/base.py", "samplers/hf.py", "samplers/vllm.py", "generation.py", "models.py", "data.py", "guides.py", "sharded.py")


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """A hash of the package's files that decide an answer, and of its bundled data (read once per
    process: every key names it)."""
    digest = hashlib.sha256()
    for path in [PACKAGE / name for name in CODE_FILES] + sorted((PACKAGE / "resources").glob("*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def device_identity(on_gpu: bool) -> dict:
    """What decides the arithmetic where the answers are computed: the GPU and CUDA, or the CPU's
    kernels (numerics.identity: AVX-512 and AVX2 round differently), not its thread count."""
    import torch

    if on_gpu and torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    kernels = {k: v for k, v in cpu_identity().items() if k != "threads"}
    return {"device": "cpu", **kernels}


@dataclass(frozen=True)
class FrozenAnswer:
    """One answer: its token ids, and whether it ended with an end-of-sequence token."""

    response_ids: list[int]
    finished: bool


def weights_identity(model_spec: Any) -> dict:
    """What names a model's weights (a config.ModelSpec): the spec itself, the weight files' sizes
    and modification times where it is a local directory (a retrained run_dir changes it), and the
    package's version where the weights ship inside a pip package."""
    identity: dict[str, Any] = {"model": dataclasses.asdict(model_spec)}
    path = Path(model_spec.name_or_path or "")
    if path.is_dir():
        identity["files"] = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")
        )
    if model_spec.source == "pretrained" and not path.is_dir() and model_spec.revision is None:
        # A hub model with no pinned revision: the snapshot the hub cache holds now, if any.
        identity["snapshot"] = _hub_snapshot(model_spec.name_or_path)
    if model_spec.source == "package_gguf":
        try:
            identity["package"] = importlib.metadata.version(model_spec.name_or_path)
        except importlib.metadata.PackageNotFoundError:
            pass
    return identity


def _hub_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r for r in scan_cache_dir().repos if r.repo_id == repo_id and r.repo_type == "model"]
    except Exception:  # no hub cache at all: the name is all there is
        return None
    refs = sorted(rev.commit_hash for repo in repos for rev in repo.revisions if "main" in rev.refs)
    return refs[-1] if refs else None


class AnswerCache:
    """Answers of frozen answerers under `root`, one directory per key; `context` is what the
    run decides for every answer (precision, numerics, accelerator, versions)."""

    def __init__(self, root: str | Path, context: Mapping[str, Any]):
        self.root = Path(root).expanduser()
        self.context = dict(context)

    def decided_by(self, answerer: Mapping[str, Any], prompts: Sequence[Sequence[int]], decoding: Mapping[str, Any]) -> dict:
        """What decides validation's answers: the answerer's weights, the prompt tokens, decoding."""
        return self.material(answerer=answerer, prompts=[[int(t) for t in p] for p in prompts], decoding=dict(decoding))

    def material(self, **parts: Any) -> dict:
        """`parts` with the format, the code and the run's context: what a key hashes."""
        return {"format": FORMAT, "code": code_identity(), **parts, "context": self.context}

    def key(self, answerer: Mapping[str, Any], prompts: Sequence[Sequence[int]], decoding: Mapping[str, Any]) -> str:
        return self.key_of(self.decided_by(answerer, prompts, decoding))

    @staticmethod
    def key_of(material: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str) -> list[FrozenAnswer] | None:
        """The kept answers, in prompt order; None on a miss (or an entry that cannot be read)."""
        rows = self.load_rows(key)
        try:
            return None if rows is None else [FrozenAnswer([int(t) for t in r["response_ids"]], bool(r["finished"])) for r in rows]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("answer cache %s: unreadable (%s); decoding those answers again", self.path(key), exc)
            return None

    def store(self, key: str, answers: Sequence[FrozenAnswer], decided_by: Mapping[str, Any]) -> Path | None:
        return self.store_rows(key, [dataclasses.asdict(a) for a in answers], decided_by)

    def load_rows(self, key: str) -> list[dict] | None:
        """The kept rows; None on a miss, or for an entry that cannot be read whole (it is then
        decoded again; the entry, maybe another process's, is never written to)."""
        entry = self.path(key)
        if not (entry / COMPLETE).exists():
            return None
        try:
            text = (entry / ANSWERS).read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines()]
            if not text.endswith("\n") or not all(isinstance(r, dict) for r in rows):
                raise ValueError("a row is cut off or is not an object")
            return rows
        except (OSError, ValueError) as exc:
            log.warning("answer cache %s: unreadable (%s); decoding those answers again", entry, exc)
            return None

    def store_rows(self, key: str, rows: Sequence[Mapping[str, Any]], decided_by: Mapping[str, Any]) -> Path | None:
        """Keep `rows` under `key`; None (with a warning, the run goes on) where the cache cannot
        be written."""

        def fill(directory: Path) -> None:
            write_jsonl_atomic(directory / ANSWERS, rows)
            write_text_atomic(directory / DECIDED_BY, json.dumps(decided_by, sort_keys=True, default=str))

        try:
            return published_directory(self.path(key), fill, COMPLETE)
        except OSError as exc:
            log.warning("cannot keep answers in %s (%s): the next run decodes them again", self.root, exc.strerror or exc)
            return None
