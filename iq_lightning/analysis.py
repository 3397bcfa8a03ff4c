"""Reading a run directory back: per-epoch metrics, rollouts, and token-credit heat maps
(paper Fig. 8) as self-contained HTML."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from iq_lightning.objective import token_credit
from iq_lightning.rollouts import Rollout, read_rollouts


def safe_filename(name: str) -> str:
    """An id or contestant name as a file name: anything but [A-Za-z0-9-_.=] becomes '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


def epoch_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """One row per epoch from metrics/metrics.csv (the epoch-level figures only)."""
    rows = []
    with open(Path(run_dir) / "metrics" / "metrics.csv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss_epoch"):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def rollouts(run_dir: str | Path) -> list[Rollout]:
    """Every stored rollout of a run, all epochs and ranks, in epoch order."""
    found = []
    for path in sorted((Path(run_dir) / "rollouts").glob("epoch_*.jsonl")):
        found.extend(read_rollouts(path))
    return found


def credit_html(
    tokenizer: PreTrainedTokenizerBase,
    response_ids: Sequence[int],
    target_logprobs: Sequence[float],
    ref_logprobs: Sequence[float],
    prompt: str,
    heading: str,
    beta: float = 1.0,
) -> str:
    """Paper Fig. 8: the response's tokens coloured by credit_t = beta * (log pi_hat - log pi_ref),
    green where the estimated better policy favours the token over the reference, red where it
    disfavours it. A self-contained HTML page (hover a token for its value)."""
    import torch

    credit = token_credit(torch.tensor(list(target_logprobs)), torch.tensor(list(ref_logprobs)), beta).tolist()
    scale = max((abs(c) for c in credit), default=1.0) or 1.0
    spans = []
    for token_id, c in zip(response_ids, credit):
        text = html.escape(tokenizer.decode([token_id])).replace("\n", "&#8629;<br>")
        strength = min(abs(c) / scale, 1.0)
        rgb = "40,160,60" if c >= 0 else "210,50,50"
        spans.append(f'<span title="{c:+.3f}" style="background: rgba({rgb},{strength:.2f})">{text}</span>')
    return (
        "<!doctype html><meta charset='utf-8'><title>token credit</title>"
        "<body style='font-family: sans-serif; max-width: 48em'>"
        f"<p><b>Prompt</b> ({html.escape(heading)}): {html.escape(prompt)}</p>"
        f"<p><b>Response</b>, coloured by credit (beta={beta}; hover for values):</p>"
        f"<p style='line-height: 1.8'>{''.join(spans)}</p></body>"
    )


def rollout_credit_html(rollout: Rollout, tokenizer: PreTrainedTokenizerBase, beta: float = 1.0) -> str:
    """The credit map of a stored training sample (its targets were computed when it was drawn)."""
    return credit_html(
        tokenizer,
        rollout.response_ids,
        rollout.target_logprobs,
        rollout.ref_logprobs,
        rollout.messages[-1]["content"],
        f"{rollout.prompt_id}, epoch {rollout.epoch}",
        beta,
    )
