"""Prompt data: the bundled prompt set, Anthropic HH-RLHF conversation prefixes (paper Sec. 5.1),
and local JSONL/Parquet files; all become chat messages that end in a user turn. Where the data
has them (HH-RLHF, local rows with `chosen` / `rejected`), a prompt also keeps the preference
pair's two final assistant replies, for DPO on the dataset's own pairs (objective.pairs=dataset)."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from iq_lightning.config import DataSpec
from iq_lightning.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

Messages = tuple[dict[str, str], ...]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One prompt x: a conversation prefix ending in a user turn; `chosen` / `rejected`: the
    data's preferred and dispreferred final assistant replies to it, where it has them."""

    id: str
    messages: Messages
    category: str | None = None
    chosen: str | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class EncodedPrompt:
    prompt: Prompt
    input_ids: tuple[int, ...]


@dataclass
class PromptStats:
    loaded: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    limit: int | None = None  # data.limit, when it left prompts out
    limited: int = 0  # prompts left out by data.limit

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        limited = f"data.limit={self.limit} left {self.limited} out; " if self.limited else ""
        return f"{self.kept} prompts kept of {self.loaded} ({limited}skipped: {skipped})"


# --- HH-RLHF -----------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat messages (user/assistant)."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def hh_rlhf_prefix(chosen: str, rejected: str) -> list[dict[str, str]] | None:
    """The conversation prefix shared by a chosen/rejected pair, both final replies dropped.

    Returns the longest common run of turns, cut back to end with a user turn; None if there
    is none (such rows are skipped).
    """
    a, b = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    shared = []
    for turn_a, turn_b in zip(a, b):
        if turn_a != turn_b:
            # The last user turn can match while the replies differ; a differing reply ends the prefix.
            break
        shared.append(turn_a)
    while shared and shared[-1]["role"] != "user":
        shared.pop()
    return shared or None


def hh_rlhf_replies(chosen: str, rejected: str, prefix_turns: int) -> tuple[str, str] | None:
    """The pair's final assistant replies after the shared prefix of `prefix_turns` turns; None
    where either conversation goes on for more than one assistant turn after it (the pair then
    differs earlier, and no single reply answers the prefix)."""
    rest_a, rest_b = parse_hh_dialogue(chosen)[prefix_turns:], parse_hh_dialogue(rejected)[prefix_turns:]
    if len(rest_a) != 1 or len(rest_b) != 1 or rest_a[0]["role"] != "assistant" or rest_b[0]["role"] != "assistant":
        return None
    return rest_a[0]["content"], rest_b[0]["content"]


def _hh_rows(spec: DataSpec) -> Iterator[dict[str, Any]]:
    import datasets

    split = spec.split or "train"
    for subset in spec.hh_subsets:
        try:
            rows = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=subset, split=split)
        except Exception as exc:  # datasets raises many types for offline / missing data
            first = first_line(exc)
            raise DataError(f"cannot load Anthropic/hh-rlhf ({subset}, split {split}); offline? {first}") from None
        for i, row in enumerate(rows):
            yield {"id": f"{subset}/{split}/{i}", **row}


def _load_hh_rlhf(spec: DataSpec, stats: PromptStats) -> list[Prompt]:
    prompts = []
    for row in _hh_rows(spec):
        stats.loaded += 1
        try:
            messages = hh_rlhf_prefix(row["chosen"], row["rejected"])
        except (KeyError, ValueError, TypeError):
            stats.skip("malformed")
            continue
        if messages is None:
            stats.skip("no shared prefix")
            continue
        replies = hh_rlhf_replies(row["chosen"], row["rejected"], len(messages)) or (None, None)
        prompts.append(Prompt(id=row["id"], messages=tuple(messages), category=row["id"].split("/")[0], chosen=replies[0], rejected=replies[1]))
    return prompts


def _load_beavertails(spec: DataSpec, stats: PromptStats) -> list[Prompt]:
    """PKU-Alignment/BeaverTails-Evaluation: harmful queries in 14 categories (paper Sec. 5.3)."""
    import datasets

    try:
        rows = datasets.load_dataset("PKU-Alignment/BeaverTails-Evaluation", split=spec.split or "test")
    except Exception as exc:  # datasets raises many types for offline / missing data
        first = first_line(exc)
        raise DataError(f"cannot load PKU-Alignment/BeaverTails-Evaluation; offline? {first}") from None
    prompts = []
    for i, row in enumerate(rows):
        stats.loaded += 1
        prompts.append(Prompt(id=f"beavertails/{i}", messages=({"role": "user", "content": str(row["prompt"])},), category=row.get("category")))
    return prompts


# --- JSONL / Parquet rows ------------------------------------------------------------------------


def _messages_from_row(row: dict[str, Any], where: str) -> Messages:
    if "messages" in row and row["messages"] is not None:
        raw = row["messages"]
        if not isinstance(raw, (list, tuple)) or not all(isinstance(m, dict) for m in raw):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        messages = []
        for m in raw:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs role in {_ROLES} and a string content")
            messages.append({"role": m["role"], "content": m["content"]})
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # a trailing reply is what the policy must produce; drop it
        return tuple(messages)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        return ({"role": "user", "content": row["prompt"]},)
    raise DataError(f"{where}: a row needs a 'prompt' string or a 'messages' list (keys: {sorted(row)})")


def _replies_from_row(row: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """A row's preference pair: `chosen` and `rejected` final assistant replies (strings), both or neither."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None and rejected is None:
        return None, None
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{where}: a preference pair needs both 'chosen' and 'rejected' as strings (the final assistant replies)")
    return chosen, rejected


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Bytes, decoded line by line: a file that is not UTF-8 fails naming its line, not with a
    # UnicodeDecodeError from the middle of the file iterator.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is dropped
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 ({exc.reason} at column {exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet ({exc})") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError as exc:
        # Parquet strings are UTF-8 by definition, but writers do not all check: find the row.
        bad = next(i for i in range(table.num_rows) if not _decodes(table.slice(i, 1)))
        raise DataError(f"{_where(path, bad + 1)}: not UTF-8 ({exc.reason}); rewrite the file with UTF-8 strings") from None


def _decodes(table) -> bool:
    try:
        table.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _where(path: Path, number: int) -> str:
    """Where a row is, for messages: path:line in JSONL, the row number in Parquet."""
    return f"{path}, row {number}" if path.suffix.lower() == ".parquet" else f"{path}:{number}"


def _read_table(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from read_jsonl(path)
    elif suffix == ".parquet":
        yield from enumerate(_parquet_rows(path), start=1)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")


def _row_id(row: dict[str, Any]) -> str | None:
    """The row's own id; None where it has none (missing, null, NaN or blank)."""
    value = row.get("id")
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def _load_rows(path: Path, split: str | None, stats: PromptStats) -> list[Prompt]:
    """Rows of a local file. Ids are unique over the whole file, all splits together (evaluation
    keys answers by id, validation tells held-out prompts from training ones by id): a row without
    one takes its row number (its line in JSONL), and a repeated id stops the load."""
    prompts = []
    first_at: dict[str, str] = {}
    for number, row in _read_table(path):
        where = _where(path, number)
        own = _row_id(row)
        prompt_id = str(number) if own is None else own
        if prompt_id in first_at:
            raise DataError(f"{where}: duplicate id {prompt_id!r} (first at {first_at[prompt_id]}); prompt ids must be unique")
        first_at[prompt_id] = where if own is not None else f"{where}, which has no id and takes its row number"
        if split is not None and "split" in row and row["split"] != split:
            continue
        stats.loaded += 1
        messages = _messages_from_row(row, where)
        chosen, rejected = _replies_from_row(row, where)
        prompts.append(Prompt(id=prompt_id, messages=messages, category=row.get("category"), chosen=chosen, rejected=rejected))
    return prompts


def _refuse_duplicate_ids(prompts: Sequence[Prompt], source: str) -> None:
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise DataError(f"data.source={source}: duplicate prompt id {prompt.id!r}; prompt ids must be unique")
        seen.add(prompt.id)


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("iq_lightning") / "resources" / "prompts.jsonl"))


def load_prompts(spec: DataSpec) -> tuple[list[Prompt], PromptStats]:
    """Raw prompts from the configured source (not yet tokenized or filtered)."""
    stats = PromptStats()
    if spec.source == "hh_rlhf":
        prompts = _load_hh_rlhf(spec, stats)
        _refuse_duplicate_ids(prompts, spec.source)  # data.hh_subsets naming one subset twice
    elif spec.source == "beavertails":
        prompts = _load_beavertails(spec, stats)
    elif spec.source == "local":
        prompts = _load_rows(Path(spec.path), spec.split if spec.split else None, stats)
    else:
        prompts = _load_rows(bundled_prompts_path(), spec.split, stats)
    if spec.limit is not None and len(prompts) > spec.limit:
        stats.limit, stats.limited = spec.limit, len(prompts) - spec.limit
        prompts = prompts[: spec.limit]
    return prompts, stats


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt with the assistant's generation header.

    Message contents are text: a user message holding `<|im_end|><|im_start|>system ...` must not
    become a real turn (HH-RLHF and BeaverTails are third-party text), so a special token is an
    id only where the template itself writes it. A prompt whose contents hold no added token's
    text is tokenized whole, exactly as the template renders it; one that does is tokenized piece
    by piece, the template's pieces with special tokens, the contents with them split as text."""
    ids = chat_ids(tokenizer, messages)
    # Templates that leave BOS to the tokenizer (Zephyr's, Mistral's) would lose it here.
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], suffix: str = "", generation_prompt: bool = True) -> list[int]:
    """The template rendered (with the generation header unless `generation_prompt` is False),
    then `suffix` (text the caller writes, e.g. a judge's verdict format), as token ids; contents
    as text (encode_prompt). No BOS added."""
    messages = list(messages)
    if any(_holds_added_token(tokenizer, m.get("content")) for m in messages):
        return _encode_contents_as_text(tokenizer, messages, suffix, generation_prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) + suffix
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _holds_added_token(tokenizer: PreTrainedTokenizerBase, content: Any) -> bool:
    return isinstance(content, str) and any(token in content for token in tokenizer.get_added_vocab())


def _encode_contents_as_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], suffix: str = "", generation_prompt: bool = True
) -> list[int]:
    """Render with a unique marker per content, then tokenize around the markers: the template's
    text with special tokens parsed, each content with them split (`split_special_tokens`)."""
    vocabulary = set(tokenizer.get_added_vocab())
    markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
    marked = [{**m, "content": marker} if isinstance(m.get("content"), str) else m for m, marker in zip(messages, markers)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=generation_prompt, tokenize=False)
    ids: list[int] = []
    for i, (message, marker) in enumerate(zip(messages, markers)):
        if marker not in marked[i].get("content", ""):
            continue
        before, found, text = text.partition(marker)
        if not found or marker in text or any(marker in t for t in vocabulary):
            raise DataError(f"the chat template does not write message {i}'s content once and as given; cannot encode it safely")
        if before:
            ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if text + suffix:
        ids += tokenizer(text + suffix, add_special_tokens=False)["input_ids"]
    return list(ids)


def encode_prompts(
    prompts: Iterable[Prompt], tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int, stats: PromptStats
) -> list[EncodedPrompt]:
    """Tokenize, skipping (and counting) empty and over-long prompts."""
    kept = []
    for prompt in prompts:
        if not prompt.messages or prompt.messages[-1]["role"] != "user" or not prompt.messages[-1]["content"].strip():
            stats.skip("empty")
            continue
        ids = encode_prompt(tokenizer, prompt.messages)
        if len(ids) > max_prompt_tokens:
            stats.skip("over-long")
            continue
        kept.append(EncodedPrompt(prompt=prompt, input_ids=tuple(ids)))
    stats.kept = len(kept)
    return kept


def prepare_prompts(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[list[EncodedPrompt], PromptStats]:
    prompts, stats = load_prompts(spec)
    encoded = encode_prompts(prompts, tokenizer, spec.max_prompt_tokens, stats)
    if not encoded:
        raise DataError(f"no usable prompts from data.source={spec.source}: {stats.describe()}")
    return encoded, stats


def keep_pairs(prompts: Sequence[EncodedPrompt], stats: PromptStats, source: str) -> list[EncodedPrompt]:
    """The prompts with a usable preference pair (objective.pairs=dataset); the others are skipped
    and counted in `stats`: no pair in the data, an empty reply, or chosen == rejected (HH-RLHF
    holds some: nothing to prefer). None left is an error naming the alternative."""
    kept = []
    for p in prompts:
        chosen, rejected = p.prompt.chosen, p.prompt.rejected
        if chosen is None or rejected is None:
            stats.skip("no preference pair")
        elif not chosen.strip() or not rejected.strip():
            stats.skip("empty reply in the pair")
        elif chosen.strip() == rejected.strip():
            stats.skip("chosen == rejected")
        else:
            kept.append(p)
    stats.kept = len(kept)
    if not kept:
        raise DataError(
            f"objective.pairs=dataset: no prompt of data.source={source} has a usable chosen/rejected pair ({stats.describe()}); "
            "use objective.pairs=principle (pairs from the principle contrast)"
        )
    return kept


OVER_CONTEXT = "over the context"


def fit_context(
    prompts: Sequence[EncodedPrompt],
    limits: Mapping[str, int],
    max_new_tokens: int,
    stats: PromptStats | None,
    winner_length: Callable[[EncodedPrompt], int] | None = None,
    new_tokens_key: str = "sampler.max_new_tokens",
    what: str = "prompts",
) -> list[EncodedPrompt]:
    """The prompts whose longest rendering plus `max_new_tokens` fits the smallest of `limits`
    (the model's max_position_embeddings, vLLM's max_model_len, an aligned guide's positions; each
    named for the messages). `winner_length`: the length of the prompt the winner guide reads (x_w,
    with the principle), where it can be longer than the plain one.

    Like data.max_prompt_tokens, a prompt that does not fit is skipped and counted in `stats`
    (reason "over the context"), with one warning naming the first; none fitting, or
    `max_new_tokens` leaving no room at all, is an error. `new_tokens_key` and `what` name the
    setting and the prompts in the messages (e.g. "val.max_new_tokens", "held-out prompts")."""
    name, limit = min(limits.items(), key=lambda item: item[1])
    if max_new_tokens >= limit:
        raise ConfigError(
            f"{new_tokens_key}={max_new_tokens} leaves no room for a prompt in the context of {limit} tokens ({name}); "
            f"lower {new_tokens_key}"
        )
    kept, first = [], None
    for prompt in prompts:
        length, which = len(prompt.input_ids), "tokens"
        if winner_length is not None and length + max_new_tokens <= limit:
            length, which = max(length, winner_length(prompt)), "tokens with the principle"
        if length + max_new_tokens > limit:
            first = first or f"id {prompt.prompt.id!r}: {length} {which} + {max_new_tokens} > {limit}"
            continue
        kept.append(prompt)
    skipped = len(prompts) - len(kept)
    if not skipped:
        return kept
    detail = (
        f"context of {limit} tokens ({name}); first: {first}; "
        f"shorten the prompts (data.max_prompt_tokens) or lower {new_tokens_key}"
    )
    if not kept:
        raise DataError(f"no {what} fit with {new_tokens_key}={max_new_tokens} in the {detail}")
    if stats is not None:
        stats.skipped[OVER_CONTEXT] = stats.skipped.get(OVER_CONTEXT, 0) + skipped
        stats.kept = len(kept)
    log.warning("%d of %d %s skipped: prompt + %s do not fit the %s", skipped, len(prompts), what, new_tokens_key, detail)
    return kept
