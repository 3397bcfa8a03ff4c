"""Beam search over the policy's likelihood (r-to-Q*): generate.py's and the evaluation's decoding,
the answers' cache key, and the evaluation's win rate against the number of beams."""

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONF, REPO
from iq_lightning.config import DataSpec, DecodingSpec, ModelSpec, SamplerSpec
from iq_lightning.data import encode_prompt, prepare_prompts
from iq_lightning.errors import ConfigError
from iq_lightning.samplers import SamplingParams, eos_ids
from iq_lightning.samplers.beam import BeamSearch
from iq_lightning.samplers.hf import HFSampler

QUESTIONS = ["Hi there", "What is the capital of France, please?", "x", "Tell me a story about a cat", "abc", "Why?"]


@pytest.fixture(scope="module")
def peaky(tiny):
    """The tiny model with a sharper next-token distribution and an end of answer that some
    contexts make likely: answers of several lengths, and beams that beat greedy decoding."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    eos = eos_ids(tokenizer, model.generation_config.eos_token_id)
    with torch.no_grad():
        model.lm_head.weight *= 10
        model.lm_head.weight[eos[0]] *= 3
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return model, tokenizer, eos, prompts


def answer_logprobs(model, prompt: list[int], answer: list[int]) -> list[float]:
    """log pi(y_t | x, y_<t) of each answer token, one unpadded sequence (independent of the code under test)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist()


def score(logprobs: list[float], length_penalty: float) -> float:
    """Beam search's ranking of a finished answer: sum log p / length ** length_penalty."""
    return sum(logprobs) / len(logprobs) ** length_penalty


def direct_beam_search(model, prompt, eos, pad, num_beams, length_penalty, max_new_tokens) -> list[int]:
    """transformers' beam search called directly, one prompt, cut after its first end of answer."""
    out = model.generate(
        input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), num_beams=num_beams,
        length_penalty=length_penalty, do_sample=False, early_stopping=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=pad,
    )[0, len(prompt):].tolist()
    return out[: out.index(eos[0]) + 1] if eos[0] in out else out


# --- the decoding itself ----------------------------------------------------------------------


@pytest.mark.parametrize(("num_beams", "length_penalty"), [(2, 1.0), (4, 0.0), (4, 2.0), (8, -1.0)])
def test_beam_search_is_transformers_beam_search(peaky, num_beams, length_penalty):
    model, tokenizer, eos, prompts = peaky
    # batch_size 8: several prompts, left-padded, per generate call
    search = BeamSearch(DecodingSpec(num_beams, length_penalty), 8, eos, tokenizer.pad_token_id, show_progress=False)
    answers = search.generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0.7, seed=3))
    for prompt, answer in zip(prompts, answers):
        want = direct_beam_search(model, prompt, eos, tokenizer.pad_token_id, num_beams, length_penalty, 16)
        assert answer.response_ids == want
        assert answer.finished == (want[-1] == eos[0])
        assert answer.sampling_logprobs == pytest.approx(answer_logprobs(model, prompt, want), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beams_that_keep_every_answer_find_the_best_one_and_never_lose_to_greedy(peaky, length_penalty):
    """Beam search does not promise to beat greedy decoding (a beam can lose the greedy path and
    end lower). What it does promise: the answer it returns is the best by sum log p /
    length**length_penalty of those it kept. With as many beams as tokens and two new tokens it
    keeps them all: its answer is then the best of all answers (brute force here), which is at
    least as good as greedy's."""
    model, tokenizer, eos, prompts = peaky
    vocab = model.config.vocab_size
    search = BeamSearch(DecodingSpec(vocab, length_penalty), vocab, eos, tokenizer.pad_token_id, show_progress=False)
    greedy = HFSampler(8, eos, tokenizer.pad_token_id, show_progress=False).generate(model, prompts, SamplingParams(2, temperature=0))
    beaten = 0
    for prompt, answer, plain in zip(prompts, search.generate(model, prompts, SamplingParams(2)), greedy):
        # every finished answer of at most two tokens: the end alone, or any two tokens
        with torch.no_grad():
            first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
            rows = torch.tensor([prompt + [t] for t in range(vocab)])
            second = torch.log_softmax(model(rows).logits[:, -1].float(), -1)
        pairs = (first[:, None] + second) / 2**length_penalty
        pairs[eos[0]] = float("-inf")  # an answer ends at its end token
        best = max(float(first[eos[0]]), float(pairs.max()))
        found = score(answer_logprobs(model, prompt, answer.response_ids), length_penalty)
        assert found == pytest.approx(best, abs=1e-4)
        greedy_score = score(answer_logprobs(model, prompt, plain.response_ids), length_penalty)
        assert found >= greedy_score - 1e-4
        beaten += found > greedy_score + 1e-3
    assert beaten >= 1  # the search did more than greedy decoding on some prompt


def _generate(tmp_path, name: str, **kwargs):
    from iq_lightning.generation import GenerateSpec, generate_responses

    spec = GenerateSpec(
        model=ModelSpec(source="tiny"), data=DataSpec(split="test", limit=4), sampler=SamplerSpec(max_new_tokens=8, temperature=0.7),
        output=tmp_path / f"{name}.jsonl", seed=5, **kwargs,
    )
    path = generate_responses(spec, show_progress=False)
    return path.read_bytes(), [json.loads(line) for line in path.read_text().splitlines()]


def test_one_beam_is_the_samplers_decoding_and_more_beams_are_beam_search(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # generate on the CPU, as the answers it is compared with
    model, tokenizer = tiny
    default, rows = _generate(tmp_path, "default")
    one_beam, _ = _generate(tmp_path, "one_beam", decoding=DecodingSpec(num_beams=1, length_penalty=3.0, early_stopping=True))
    assert one_beam == default and all("decoding" not in r for r in rows)  # the length penalty is for beams only
    prompts = [p.input_ids for p in prepare_prompts(DataSpec(split="test", limit=4), tokenizer)[0]]
    eos = eos_ids(tokenizer, model.generation_config.eos_token_id)
    sampled = HFSampler(16, eos, tokenizer.pad_token_id, show_progress=False).generate(model, prompts, SamplingParams(8, 0.7, 1.0, seed=5))
    from iq_lightning.text_quality import decode_whole  # (a character cut off at max_new_tokens is left out)

    assert [r["response"] for r in rows] == [decode_whole(tokenizer, g.response_ids) for g in sampled]

    _, beams = _generate(tmp_path, "beams", decoding=DecodingSpec(num_beams=3))
    want = [direct_beam_search(model, list(p), eos, tokenizer.pad_token_id, 3, 1.0, 8) for p in prompts]
    assert [r["response"] for r in beams] == [decode_whole(tokenizer, w) for w in want]
    assert [r["num_tokens"] for r in beams] == [len(w) for w in want]
    assert beams[0]["decoding"] == {"num_beams": 3, "length_penalty": 1.0, "early_stopping": False}
    assert [r["response"] for r in beams] != [r["response"] for r in rows]


# --- configuration ----------------------------------------------------------------------------


def _compose_eval(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="evaluate", overrides=overrides)


TINY_EVAL = ["model=tiny", "logger=none", "data.limit=4", "sampler.max_new_tokens=6"]


def test_the_answers_cache_key_follows_the_decoding(tmp_path, monkeypatch):
    from iq_lightning.evaluation import answers as answers_module
    from iq_lightning.evaluation.spec import ContestantSpec, build_eval_spec

    spec = build_eval_spec(_compose_eval(TINY_EVAL + [f"out_dir={tmp_path}"]))
    key = lambda **decoding: answers_module.generation_key(spec, ContestantSpec("sft", decoding=DecodingSpec(**decoding)))  # noqa: E731
    assert key() == answers_module.generation_key(spec, ContestantSpec("sft"))
    assert key(num_beams=1, length_penalty=2.0, early_stopping=True) == key()  # one beam: these change nothing
    keys = [key(), key(num_beams=4), key(num_beams=8), key(num_beams=4, length_penalty=2.0), key(num_beams=4, early_stopping="never")]
    assert len(set(keys)) == len(keys)

    decodings = []

    def fake_generate(gen_spec, show_progress=True):
        decodings.append(gen_spec.decoding)
        gen_spec.output.parent.mkdir(parents=True, exist_ok=True)
        gen_spec.output.write_text(json.dumps({"id": "p0", "messages": [], "response": "r"}) + "\n")
        return gen_spec.output

    monkeypatch.setattr(answers_module, "generate_responses", fake_generate)
    four = ContestantSpec("sft", decoding=DecodingSpec(num_beams=4))
    answers_module.answers(spec, ContestantSpec("sft"), show_progress=False)
    answers_module.answers(spec, four, show_progress=False)
    answers_module.answers(spec, four, show_progress=False)  # cached: no third generation
    assert decodings == [DecodingSpec(), DecodingSpec(num_beams=4)]
    assert len(list((tmp_path / "generations").glob("sft-*.jsonl"))) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+contestants.sft.decoding.num_beams=0"], "contestants.sft.decoding.num_beams must be >= 1, got 0"),
        (["+contestants.sft.decoding.length_penalty=long"], "contestants.sft.decoding.length_penalty must be a number"),
        (["+contestants.sft.decoding.beams=4"], "unknown key contestants.sft.decoding.beams"),
        (["sampler=vllm", "+contestants.sft.decoding.num_beams=4"], "contestants.sft.decoding.num_beams=4: beam search runs with transformers' generate only; add sampler=hf"),
        (["beam_sweep.contestant=nobody"], "beam_sweep.contestant='nobody' is not a contestant"),
        (["beam_sweep.contestant=sft"], "beam_sweep.contestant='sft' is the reference"),
        (["beam_sweep.contestant=prompting", "beam_sweep.num_beams=[1,0]"], "beam_sweep.num_beams must be >= 1, got 0"),
        (["beam_sweep.contestant=prompting", "beam_sweep.num_beams=[2,2]"], "beam_sweep.num_beams names a count twice"),
        (["beam_sweep.contestant=prompting", "beam_sweep.num_beams=4"], "beam_sweep.num_beams must be a list"),
    ],
)
def test_a_bad_decoding_in_the_evaluation_is_refused_before_anything_loads(tmp_path, overrides, message):
    from iq_lightning.evaluation.spec import build_eval_spec

    with pytest.raises(ConfigError) as error:
        build_eval_spec(_compose_eval(TINY_EVAL + [f"out_dir={tmp_path}"] + overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_takes_a_contestants_decoding():
    from iq_lightning.cli import command_line_help_or_error

    args = ["+contestants.iq.model_path=/m", "+contestants.iq.decoding.num_beams=4", "+contestants.sft.decoding.length_penalty=0.5"]
    assert command_line_help_or_error(CONF, "evaluate", "", args + ["beam_sweep.contestant=iq", "beam_sweep.num_beams=[1,2]"]) is None
    assert command_line_help_or_error(CONF, "generate", "", ["decoding.num_beams=4", "decoding.length_penalty=0.5"]) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["decoding.num_beams=0"], "error: decoding.num_beams must be >= 1, got 0"),
        (["sampler=vllm", "decoding.num_beams=4"], "error: decoding.num_beams=4: beam search runs with transformers' generate only; add sampler=hf"),
    ],
)
def test_a_bad_decoding_of_generate_is_one_error_line(tmp_path, overrides, message):
    result = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "model=tiny", f"hydra.run.dir={tmp_path}", *overrides],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]


# --- the evaluation's sweep over beams --------------------------------------------------------


def test_the_beam_sweep_adds_a_contestant_per_count_and_plots_win_rate_against_beams(tmp_path):
    from iq_lightning.evaluation.run import evaluate
    from iq_lightning.evaluation.spec import build_eval_spec

    out = tmp_path / "evaluation"
    overrides = TINY_EVAL + [
        f"out_dir={out}", "beam_sweep.contestant=prompting", "beam_sweep.num_beams=[1,2,4]", "pairs=reference", "credit_maps=0",
        "judge_free.enabled=false", "judge_check.matches=0", "judge_check.controls=0", "elo.permutations=10", "elo.bootstrap=0",
        "judge.batch_size=8",
    ]
    result = evaluate(build_eval_spec(_compose_eval(overrides)), show_progress=False)
    # prompting itself answers for 1 beam (its own decoding); the other counts are new contestants
    assert sorted(result.elo.players) == ["prompting", "prompting@beams=2", "prompting@beams=4", "sft"]
    assert sorted({(j.a, j.b) if j.b == "sft" else (j.b, j.a) for j in result.judgments}) == [
        ("prompting", "sft"), ("prompting@beams=2", "sft"), ("prompting@beams=4", "sft"),
    ]
    assert (out / "plots" / "win_rate_vs_beams.png").stat().st_size > 5000
    with (out / "results" / "beam_sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["num_beams"], r["a"], r["b"]) for r in table] == [("1", "prompting", "sft"), ("2", "prompting@beams=2", "sft"), ("4", "prompting@beams=4", "sft")]
    for row in table:
        rate = result.rates.get((row["a"], "sft")) or result.rates[("sft", row["a"])]
        assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == rate.valid == 4
    generations = {p.name.rsplit("-", 1)[0]: [json.loads(line) for line in p.read_text().splitlines()] for p in (out / "generations").glob("*.jsonl")}
    assert sorted(generations) == ["prompting", "prompting_beams=2", "prompting_beams=4", "sft"]
    assert generations["prompting_beams=4"][0]["decoding"]["num_beams"] == 4 and "decoding" not in generations["prompting"][0]
    for row in table:
        rows = generations[row["a"].replace("@", "_")]
        assert float(row["mean_tokens"]) == pytest.approx(sum(r["num_tokens"] for r in rows) / len(rows), abs=0.01)
