"""Issue 24's options from the config to where they act: the loss options reach InverseQ, the
alpha warm-up reaches the guides' scoring epoch by epoch, several principles build one guide per
principle, bad values are one ConfigError line, and runs started before the keys existed resume."""

import json

import pytest
import torch

from conftest import compose
from iq_lightning.config import build_run_config, principle_placements, principle_weights
from iq_lightning.data import EncodedPrompt, Prompt
from iq_lightning.datamodule import OnPolicyDataModule
from iq_lightning.errors import ConfigError
from iq_lightning.guides import GuideScores
from iq_lightning.objectives import InverseQ, build_objective
from iq_lightning.samplers.base import Generation, SamplingParams

TWO = 'guide.principles=[{text: "Always reply in German.", alpha: 0.8}, {text: "Answer in one sentence.", alpha: 0.6}]'


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.penalty=cubic"], "objective.penalty must be one of squared, huber"),
        (["objective.huber_delta=0"], "objective.huber_delta must be a number > 0"),
        (["objective.target_clip=-1"], "objective.target_clip must be null or a number > 0"),
        (["alpha_warmup_epochs=-1"], "alpha_warmup_epochs must be >= 0"),
        (["val.top_p=0"], r"val.top_p must be in \(0, 1\]"),
        (['guide.principles=[{text: "x", alpha: 0.8}]'], "guide.principle and guide.principles are both set"),
        (["guide=principles", 'guide.principles=[{text: "", alpha: 0.8}]'], r"guide.principles\[0\].text is empty"),
        (["guide=principles", 'guide.principles=[{text: " ", alpha: 0.8}]'], r"guide.principles\[0\].text is empty"),
        (["guide=principles", 'guide.principles=[{text: "a", alpha: -0.5}]'], r"guide.principles\[0\].alpha must be >= 0"),
        (["guide=principles", "guide.principles=[]"], "guide.principles is empty"),
        (["guide=principles", 'guide.principles=[{text: a, placement: assistant}]'], r"guide.principles\[0\].placement must be system or user"),
        (["guide=principles", "guide.principles=[5]"], r"guide.principles\[0\] must be a mapping"),
        (["guide=principles", 'guide.principles=[{text: a, weight: 2}]'], r"unknown key guide.principles\[0\].weight"),
        (["guide=principles", "objective=distill"], "several guide.principles train objective=inverse_q only"),
        (["guide=principles", "guide.kind=aligned_model"], "guide.principles needs guide.kind=principle"),
    ],
)
def test_bad_values_are_one_config_error(overrides, message, tmp_path):
    from iq_lightning.run import configure  # the objective's options are checked where objectives are built

    with pytest.raises(ConfigError, match=message):
        configure(compose(["model=tiny", *overrides]), tmp_path)


def test_defaults_are_off_and_the_options_reach_the_objective(tmp_path):
    run = build_run_config(compose(["model=tiny"]), tmp_path)
    objective = build_objective(run.objective, run.train.alpha, run.train.reduction)
    assert (objective.penalty, objective.target_clip, run.train.alpha_warmup_epochs, run.val.top_p) == ("squared", None, 0, 1.0)
    assert principle_weights(run.guide, run.train.alpha) == ((run.guide.principle,), (1.2,))
    run = build_run_config(compose(["model=tiny", "objective.penalty=huber", "objective.huber_delta=0.5", "objective.target_clip=2"]), tmp_path)
    objective = build_objective(run.objective, run.train.alpha, run.train.reduction)
    assert isinstance(objective, InverseQ) and (objective.penalty, objective.huber_delta, objective.target_clip) == ("huber", 0.5, 2.0)
    run = build_run_config(compose(["model=tiny", "guide=principles", TWO]), tmp_path)
    assert principle_weights(run.guide, run.train.alpha) == (("Always reply in German.", "Answer in one sentence."), (0.8, 0.6))
    assert principle_placements(run.guide) == ("user", "user")  # guide=principles sets guide.placement=user
    run = build_run_config(compose(["model=tiny", "guide=principles", 'guide.principles=[{text: a}, {text: b, placement: user}]']), tmp_path)
    assert principle_placements(run.guide) == ("user", "user")  # the bundled pair's guide.placement
    run = build_run_config(compose(["model=tiny", "guide=principles", "guide.placement=system", 'guide.principles=[{text: a}, {text: b, placement: user}]']), tmp_path)
    assert principle_placements(run.guide) == ("system", "user")


def test_inverse_q_step_clips_targets_and_takes_the_huber_penalty(tiny):
    """The step's loss equals the hand-written one over the policy's own log-probs."""
    from iq_lightning.forward import response_logprobs
    from iq_lightning.models import frozen_copy
    from iq_lightning.rollouts import Rollout, collate

    model, tokenizer = tiny
    model = frozen_copy(model)
    rollout = Rollout(
        epoch=0, prompt_id="0", category=None, messages=[{"role": "user", "content": "Hi"}], prompt_ids=[1, 5, 6],
        response_ids=[7, 8, 9], response_text="", finished=True, sampling_logprobs=[0.0] * 3,
        target_logprobs=[-0.5, -12.0, -3.0], ref_logprobs=[-2.0, -4.0, -3.5],
    )
    batch = collate([rollout], tokenizer.pad_token_id)
    policy = response_logprobs(model, batch, float32_logits=True)[0]
    targets = torch.tensor([-2.0 + 1.0, -4.0 - 1.0, -3.0])  # clipped to ref +- 1 nat
    r = targets - policy
    want = torch.where(r.abs() <= 0.5, r**2, 2 * 0.5 * r.abs() - 0.25).mean()
    got = InverseQ("token_mean", "huber", 0.5, 1.0).step(model, batch, None).loss
    torch.testing.assert_close(got, want)
    plain = InverseQ().step(model, batch, None).loss
    torch.testing.assert_close(plain, ((torch.tensor(rollout.target_logprobs) - policy) ** 2).mean())


class _Sampler:
    def update_weights(self, policy):
        pass

    def generate(self, policy, prompts, params, desc=""):
        return [Generation([4, 5], [0.0, 0.0], True) for _ in prompts]


class _Guide:
    """Records the alpha each scoring call was given."""

    def __init__(self, alpha):
        self.alpha, self.seen = alpha, []

    def score(self, prompts, responses, desc="", winner=False, alpha=None):
        self.seen.append(alpha)
        return [GuideScores([0.0] * len(r), [0.0] * len(r)) for r in responses]


@pytest.mark.parametrize(
    ("alpha", "warmup", "want"),
    [(1.5, 2, [1.0, 1.25, 1.5, 1.5]), (1.5, 0, [1.5] * 4), ((0.8, 0.6), 2, [(0.8 / 1.4, 0.6 / 1.4), (0.8 * 1.2 / 1.4, 0.6 * 1.2 / 1.4), (0.8, 0.6), (0.8, 0.6)])],
)
def test_each_epochs_alpha_reaches_the_guides(tiny, alpha, warmup, want, tmp_path):
    _, tokenizer = tiny
    prompts = [EncodedPrompt(Prompt(str(i), ({"role": "user", "content": "Hi"},)), (1, 2, 3)) for i in range(3)]
    dm = OnPolicyDataModule(prompts, _Sampler(), tokenizer, tmp_path, 3, 1, SamplingParams(2), alpha_warmup_epochs=warmup)
    guide = _Guide(alpha)
    for epoch in range(4):
        dm.collect(None, guide, epoch)
        if warmup:
            assert dm.epoch_stats["train/alpha"] == pytest.approx(sum(want[epoch]) if isinstance(alpha, tuple) else want[epoch])
    assert [pytest.approx(a) for a in guide.seen] == want


def test_runs_started_before_the_new_keys_resume(tmp_path):
    """Their record lacks the keys; they behaved as the declared defaults (run.declared_default)."""
    from iq_lightning.run import FINGERPRINT_FILE, check_resumable, restart_settings

    run = build_run_config(compose(["model=tiny"]), tmp_path)
    settings = restart_settings(run)
    new_keys = ("alpha_warmup_epochs", "objective.penalty", "objective.huber_delta", "objective.target_clip", "guide.principles", "val.top_p")
    assert all(k in settings for k in new_keys)  # they change the targets: not in RESTART_MAY_CHANGE
    old = {k: v for k, v in settings.items() if k not in new_keys}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({"settings": old}))
    check_resumable(run)
    for override in ("alpha_warmup_epochs=2", "objective.penalty=huber", "objective.target_clip=1"):
        with pytest.raises(ConfigError, match="other settings"):
            check_resumable(build_run_config(compose(["model=tiny", override]), tmp_path))


def test_validation_figures_with_several_principles():
    """kl_pi_hat against the product of the winners; kl_pi_w and nll_w under the first winner."""
    from iq_lightning.text_quality import per_token_kl
    from iq_lightning.validation import answer_figures

    g = torch.Generator().manual_seed(3)
    answer, w1, w2, lesser = (torch.randn(2, 4, 9, generator=g, dtype=torch.float64) for _ in range(4))
    ids = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    got = answer_figures(answer, (w1, w2), lesser, ids, mask, (0.8, 0.6))
    z = 0.8 * torch.log_softmax(w1, -1) + 0.6 * torch.log_softmax(w2, -1) - 0.4 * torch.log_softmax(lesser, -1)
    log_pi_hat = z - torch.logsumexp(z, -1, keepdim=True)
    mean = lambda v: (v * mask).sum(-1) / mask.sum(-1)  # noqa: E731
    torch.testing.assert_close(got["kl_pi_hat"], mean(per_token_kl(answer, log_pi_hat)))
    torch.testing.assert_close(got["nll_w"], mean(-torch.log_softmax(w1, -1).gather(-1, ids[..., None]).squeeze(-1)))
    first = answer_figures(answer, w1, lesser, ids, mask, 1.4)
    torch.testing.assert_close(got["kl_pi_w"], first["kl_pi_w"])
