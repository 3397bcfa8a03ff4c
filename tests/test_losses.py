"""losses.py against independent float64 computations (explicit loops and sums over a tiny
vocabulary), hand-computed numbers, autograd of naive formulas, and TRL where it is importable
(PYTHONPATH=<a TRL 1.16 install>; skipped otherwise)."""

import math
import statistics
import types
from collections import defaultdict

import pytest
import torch

from iq_lightning import losses
from iq_lightning.losses import (
    contrastive_sequence_reward,
    distill_loss,
    dpo_loss,
    gae,
    kl_penalized_rewards,
    masked_reduce,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    whiten,
)
from iq_lightning.objective import REDUCTIONS, inverse_q_loss

# Response masks with right padding, a fully padded row and a left gap (prompt positions).
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]])


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _reduce_by_loops(per_token, mask, reduction):
    """Explicit reduction over nested lists, the definition of inverse_q_loss's reductions."""
    sums = [sum(v for v, m in zip(row, mrow) if m) for row, mrow in zip(per_token, mask)]
    counts = [sum(mrow) for mrow in mask]
    if reduction == "sum":
        return sum(sums)
    if reduction == "token_mean":
        return sum(sums) / max(sum(counts), 1)
    means = [s / n for s, n in zip(sums, counts) if n > 0]
    return sum(means) / max(len(means), 1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_reduce_matches_loops_and_inverse_q_loss(reduction):
    values = _randn(4, 5, seed=1)
    got = masked_reduce(values, MASK, reduction)
    assert got.item() == pytest.approx(_reduce_by_loops(values.tolist(), MASK.tolist(), reduction), rel=1e-12)
    policy, target = _randn(4, 5, seed=2), _randn(4, 5, seed=3)
    torch.testing.assert_close(
        masked_reduce((target - policy) ** 2, MASK, reduction), inverse_q_loss(policy, target, MASK, reduction)
    )


def test_masked_reduce_ignores_non_finite_padding_and_rejects_unknown_reduction():
    values = _randn(4, 5, seed=4).masked_fill(MASK == 0, float("nan"))
    assert torch.isfinite(masked_reduce(values, MASK, "token_mean"))
    with pytest.raises(ValueError, match="unknown reduction"):
        masked_reduce(values, MASK, "mean")


# ---------------------------------------------------------------- distillation (GKD)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _divergence_by_sums(s_logits, t_logits, divergence, beta, temperature):
    """One token's divergence from explicit probabilities (GKD Eq. 1; TRL's ends for jsd)."""
    ps = _softmax([x / temperature for x in s_logits])
    pt = _softmax([x / temperature for x in t_logits])
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(pt, ps)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)


DIVERGENCE_CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
]


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [1, 3, 128])
def test_distill_loss_matches_explicit_sums(monkeypatch, divergence, beta, temperature, chunk_rows):
    monkeypatch.setattr(losses, "_DISTILL_CHUNK_ROWS", chunk_rows)
    student, teacher = _randn(4, 5, 7, seed=5, scale=2.0), _randn(4, 5, 7, seed=6, scale=2.0)
    per_token = [
        [_divergence_by_sums(student[i, t].tolist(), teacher[i, t].tolist(), divergence, beta, temperature)
         for t in range(5)]
        for i in range(4)
    ]
    for reduction in REDUCTIONS:
        got = distill_loss(student, teacher, MASK, divergence, beta, temperature, reduction)
        want = _reduce_by_loops(per_token, MASK.tolist(), reduction)
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12), reduction


def test_jsd_matches_torch_distributions_and_is_symmetric_at_half():
    student, teacher = _randn(3, 11, seed=7, scale=3.0), _randn(3, 11, seed=8, scale=3.0)
    mask = torch.ones(3)
    kl = torch.distributions.kl_divergence
    ps, pt = torch.distributions.Categorical(logits=student), torch.distributions.Categorical(logits=teacher)
    for beta in (0.2, 0.5, 0.7):
        mixture = torch.distributions.Categorical(probs=beta * pt.probs + (1 - beta) * ps.probs)
        want = (beta * kl(pt, mixture) + (1 - beta) * kl(ps, mixture)).mean()
        torch.testing.assert_close(distill_loss(student, teacher, mask, "jsd", beta), want)
    torch.testing.assert_close(
        distill_loss(student, teacher, mask, "jsd", 0.5), distill_loss(teacher, student, mask, "jsd", 0.5)
    )
    # the true JSD is bounded by log 2; forward and reverse KL match torch's KL in their direction
    assert distill_loss(student, teacher, mask, "jsd", 0.5).item() <= math.log(2)
    torch.testing.assert_close(distill_loss(student, teacher, mask, "forward_kl"), kl(pt, ps).mean())
    torch.testing.assert_close(distill_loss(student, teacher, mask, "reverse_kl"), kl(ps, pt).mean())


def _naive_divergence(student, teacher, divergence, beta):
    """Dense (..., T) divergence, no chunks, no checkpointing: the formula written directly."""
    ps, pt = student.softmax(-1), teacher.softmax(-1)
    if divergence == "forward_kl":
        return (pt * (pt.log() - ps.log())).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_distill_loss_gradient_matches_autograd_of_the_naive_formula(monkeypatch, divergence, beta):
    monkeypatch.setattr(losses, "_DISTILL_CHUNK_ROWS", 3)
    student = _randn(4, 5, 7, seed=9, scale=2.0).requires_grad_()
    teacher = _randn(4, 5, 7, seed=10, scale=2.0).requires_grad_()
    got = torch.autograd.grad(distill_loss(student, teacher, MASK, divergence, beta), (student, teacher))
    naive = masked_reduce(_naive_divergence(student, teacher, divergence, beta), MASK, "token_mean")
    want = torch.autograd.grad(naive, (student, teacher))
    torch.testing.assert_close(got, want)
    assert got[0][MASK == 0].abs().max() == 0
    assert got[0][MASK == 1].abs().max() > 0


def test_distill_loss_saves_no_copy_of_the_logits_for_backward(monkeypatch):
    """Autograd keeps views of the given logits and per-row scalars only: no (rows, V) tensor of
    its own (the chunks' log-softmaxes are recomputed in backward)."""
    monkeypatch.setattr(losses, "_DISTILL_CHUNK_ROWS", 4)
    model_logits = torch.randn(4, 8, 64, requires_grad=True)
    student = model_logits[:, 2:7]  # the response positions of model logits: a non-contiguous slice
    teacher = torch.randn(4, 5, 64)
    own = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in (model_logits.untyped_storage().data_ptr(),
                                                  teacher.untyped_storage().data_ptr()):
            own.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = distill_loss(student, teacher, MASK, "jsd", 0.5)
    assert own and max(own) < 64, own
    loss.backward()
    assert model_logits.grad[:, 2:7][MASK == 1].abs().sum() > 0


def test_distill_loss_is_zero_for_equal_distributions_and_float32_for_bf16():
    logits = _randn(2, 3, 9, seed=11).float()
    mask = torch.ones(2, 3)
    for divergence in losses.DIVERGENCES:
        assert distill_loss(logits, logits + 5.0, mask, divergence).item() == pytest.approx(0.0, abs=1e-6)
    out = distill_loss(logits.bfloat16(), (2 * logits).bfloat16(), mask, "jsd", 0.5)
    assert out.dtype == torch.float32 and out.item() > 0


def test_distill_loss_rejects_bad_arguments():
    logits, mask = torch.zeros(2, 3, 5), torch.ones(2, 3)
    with pytest.raises(ValueError, match="divergence"):
        distill_loss(logits, logits, mask, "kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(logits, logits, mask, "jsd", 1.5)
    with pytest.raises(ValueError, match="shapes"):
        distill_loss(logits, torch.zeros(2, 3, 6), mask)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distill_loss_matches_trl_gkd_and_sdft(monkeypatch, beta, temperature):
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    sdft = pytest.importorskip("trl.experimental.sdft.loss_utils")
    student, teacher = _randn(4, 5, 13, seed=12, scale=2.0).float(), _randn(4, 5, 13, seed=13, scale=2.0).float()
    labels = torch.where(MASK.bool(), torch.zeros_like(MASK), torch.full_like(MASK, -100))
    want = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature, "batchmean")
    got = distill_loss(student, teacher, MASK, "jsd", beta, temperature, "token_mean")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want_sum = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature, "sum")
    torch.testing.assert_close(distill_loss(student, teacher, MASK, "jsd", beta, temperature, "sum"), want_sum)
    ls, lt = (torch.log_softmax(x / temperature, -1) for x in (student, teacher))
    per_token = sdft.compute_divergence(ls, lt, beta)
    torch.testing.assert_close(got, masked_reduce(per_token, MASK, "token_mean"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DPO


def test_dpo_loss_hand_computed_at_beta_0_1():
    # chosen log-ratio +1, rejected -1: beta * margin = 0.2, loss = log(1 + e^-0.2)
    policy_c = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    loss, r_c, r_r = dpo_loss(policy_c, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), 0.1)
    assert loss.item() == pytest.approx(0.5981388693815918, rel=1e-12)
    assert r_c.tolist() == pytest.approx([0.1]) and r_r.tolist() == pytest.approx([-0.1])
    assert not r_c.requires_grad
    (grad,) = torch.autograd.grad(loss, policy_c)
    assert grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)), rel=1e-12)  # -beta * sigmoid(-0.2)


def test_dpo_loss_is_the_mean_over_pairs_and_log2_at_zero_margin():
    g = [_randn(6, seed=s, scale=20.0) for s in (14, 15, 16, 17)]
    loss, r_c, r_r = dpo_loss(*g, beta=0.3)
    want = sum(
        math.log(1 + math.exp(-0.3 * ((pc - rc) - (pr - rr))))
        for pc, pr, rc, rr in zip(*(x.tolist() for x in g))
    ) / 6
    assert loss.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(r_c - r_r, 0.3 * ((g[0] - g[2]) - (g[1] - g[3])))
    same = dpo_loss(g[0], g[0], g[2], g[2], beta=0.3)[0]
    assert same.item() == pytest.approx(math.log(2), rel=1e-12)


def _trl_dpo(chosen_tok, rejected_tok, ref_chosen, ref_rejected, mask, beta):
    """TRL 1.16's DPOTrainer._compute_loss (loss_type="sigmoid") on given per-token log-probs,
    through a stub trainer: its model returns the log-probs, the reference ones are precomputed."""
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    n, t = chosen_tok.shape
    log_probs = torch.cat([chosen_tok, rejected_tok])
    outputs = types.SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(2 * n, t),
        mean_logits=torch.zeros(2 * n, t),
        is_top1=torch.zeros(2 * n, t, dtype=torch.bool),
    )
    gathered = []

    def gather(x):
        gathered.append(x)
        return x

    model = types.SimpleNamespace(training=True)
    stub = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device="cpu", gather=gather, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    full_mask = torch.cat([torch.zeros(2 * n, 1, dtype=torch.long), torch.cat([mask, mask])], dim=1)
    inputs = {
        "input_ids": torch.zeros(2 * n, t + 1, dtype=torch.long), "attention_mask": torch.ones(2 * n, t + 1),
        "completion_mask": full_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    loss = dpo.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, gathered[0], gathered[1]


def test_dpo_loss_matches_trl_dpo_trainer():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":  # the stub mirrors _compute_loss's attributes in this version
        pytest.skip(f"the DPOTrainer stub is written for trl 1.16.0, not {trl.__version__}")
    mask = MASK[[0, 1, 3]]
    chosen_tok = (_randn(3, 5, seed=18).float() - 2) * mask
    rejected_tok = (_randn(3, 5, seed=19).float() - 2) * mask
    ref_c, ref_r = _randn(3, seed=20).float() - 6, _randn(3, seed=21).float() - 6
    want = _trl_dpo(chosen_tok, rejected_tok, ref_c, ref_r, mask, 0.1)
    got = dpo_loss(chosen_tok.sum(-1), rejected_tok.sum(-1), ref_c, ref_r, 0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- SFT and the contrastive reward


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sft_loss_is_the_reduced_negative_log_likelihood(reduction):
    logp = -_randn(4, 5, seed=22).abs()
    want = _reduce_by_loops((-logp).tolist(), MASK.tolist(), reduction)
    assert sft_loss(logp, MASK, reduction).item() == pytest.approx(want, rel=1e-12)


def test_contrastive_sequence_reward_sums_masked_log_ratios():
    logp_w, logp_l = _randn(4, 5, seed=23), _randn(4, 5, seed=24)
    got = contrastive_sequence_reward(logp_w, logp_l, MASK)
    want = [sum(w - l for w, l, m in zip(*rows) if m) for rows in zip(logp_w.tolist(), logp_l.tolist(), MASK.tolist())]
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- PPO


def test_kl_penalized_rewards_by_loops():
    score = torch.tensor([2.0, -1.0, 5.0, 0.5], dtype=torch.float64)
    logp, ref = _randn(4, 5, seed=25), _randn(4, 5, seed=26)
    got = kl_penalized_rewards(score, logp, ref, MASK, kl_coef=0.05)
    for i, mrow in enumerate(MASK.tolist()):
        last = max((t for t in range(5) if mrow[t]), default=None)
        for t in range(5):
            want = -0.05 * (logp[i, t] - ref[i, t]).item() if mrow[t] else 0.0
            if t == last:
                want += score[i].item()
            assert got[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15), (i, t)
    assert got[2].abs().sum() == 0  # no response token: no reward anywhere


def _gae_by_definition(rewards, values, gamma, lam):
    """A_t = sum_l (gamma * lam)^l delta_{t+l}, V = 0 after the last token; one response span."""
    n = len(rewards)
    nxt = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * nxt[t] - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_discounted_sum_of_td_errors(gamma, lam):
    rewards = _randn(4, 5, seed=27).masked_fill(MASK == 0, 7.0)  # junk outside the mask is ignored
    values = _randn(4, 5, seed=28).masked_fill(MASK == 0, -3.0)
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for i, mrow in enumerate(MASK.tolist()):
        span = [t for t in range(5) if mrow[t]]
        want_adv, want_ret = _gae_by_definition(
            [rewards[i, t].item() for t in span], [values[i, t].item() for t in span], gamma, lam
        )
        assert [adv[i, t].item() for t in span] == pytest.approx(want_adv, rel=1e-12, abs=1e-14)
        assert [ret[i, t].item() for t in span] == pytest.approx(want_ret, rel=1e-12, abs=1e-14)
    assert adv[MASK == 0].abs().sum() == 0 and ret[MASK == 0].abs().sum() == 0


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    rewards, values = _randn(2, 6, seed=29), _randn(2, 6, seed=30)
    mask = torch.ones(2, 6)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, rewards.flip(-1).cumsum(-1).flip(-1))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_uses_masked_mean_and_unbiased_std(shift_mean):
    x = _randn(4, 5, seed=31, scale=3.0) + 2.0
    got = whiten(x, MASK, shift_mean=shift_mean)
    kept = x[MASK.bool()].tolist()
    mean, std = statistics.mean(kept), statistics.stdev(kept)
    want = [(v - mean) / math.sqrt(std**2 + 1e-8) + (0.0 if shift_mean else mean) for v in kept]
    assert got[MASK.bool()].tolist() == pytest.approx(want, rel=1e-10)
    assert got[MASK == 0].abs().sum() == 0


def _ppo_policy_by_cases(logp, old, adv, eps):
    """The clipped objective written as its two cases: A >= 0 caps rho at 1+eps, A < 0 floors it at 1-eps."""
    rho = math.exp(logp - old)
    if adv >= 0:
        return -adv * min(rho, 1 + eps), rho > 1 + eps
    return -adv * max(rho, 1 - eps), rho < 1 - eps


def test_ppo_policy_loss_matches_the_two_cases_and_gradient_vanishes_when_clipped():
    old = _randn(4, 5, seed=32) - 1.0
    logp = (old + _randn(4, 5, seed=33, scale=0.3)).requires_grad_()
    adv = _randn(4, 5, seed=34)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, adv, MASK, clip_range=0.2)
    cases = [[_ppo_policy_by_cases(logp[i, t].item(), old[i, t].item(), adv[i, t].item(), 0.2)
              for t in range(5)] for i in range(4)]
    m = MASK.tolist()
    assert loss.item() == pytest.approx(_reduce_by_loops([[c[0] for c in r] for r in cases], m, "token_mean"))
    clipped = [[float(c[1]) for c in r] for r in cases]
    assert 0 < clip_frac.item() < 1
    assert clip_frac.item() == pytest.approx(_reduce_by_loops(clipped, m, "token_mean"))
    half_sq = (0.5 * (logp - old) ** 2).tolist()
    assert approx_kl.item() == pytest.approx(_reduce_by_loops(half_sq, m, "token_mean"))
    (grad,) = torch.autograd.grad(loss, logp)
    n = MASK.sum().item()
    for i in range(4):
        for t in range(5):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            want = 0.0 if (not m[i][t] or clipped[i][t]) else -adv[i, t].item() * rho / n
            assert grad[i, t].item() == pytest.approx(want, abs=1e-12), (i, t)


def test_ppo_policy_loss_at_the_old_policy_is_minus_the_mean_advantage():
    old, adv = _randn(4, 5, seed=35), _randn(4, 5, seed=36)
    for reduction in REDUCTIONS:
        loss, clip_frac, approx_kl = ppo_policy_loss(old.clone(), old, adv, MASK, 0.2, reduction)
        assert loss.item() == pytest.approx(-_reduce_by_loops(adv.tolist(), MASK.tolist(), reduction))
        assert clip_frac.item() == 0 and approx_kl.item() == 0


def test_ppo_value_loss_by_loops():
    old = _randn(4, 5, seed=37)
    values = (old + _randn(4, 5, seed=38, scale=0.5)).requires_grad_()
    returns = _randn(4, 5, seed=39)
    loss, clip_frac = ppo_value_loss(values, old, returns, MASK, clip_range_value=0.2)
    per_token, clipped = [], []
    for i in range(4):
        row, crow = [], []
        for t in range(5):
            v, o, g = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            v_clip = min(max(v, o - 0.2), o + 0.2)
            row.append(0.5 * max((v - g) ** 2, (v_clip - g) ** 2))
            crow.append(float((v_clip - g) ** 2 > (v - g) ** 2))
        per_token.append(row)
        clipped.append(crow)
    assert loss.item() == pytest.approx(_reduce_by_loops(per_token, MASK.tolist(), "token_mean"), rel=1e-12)
    assert 0 < clip_frac.item() < 1
    assert clip_frac.item() == pytest.approx(_reduce_by_loops(clipped, MASK.tolist(), "token_mean"))
    (grad,) = torch.autograd.grad(loss, values)
    assert grad[MASK == 0].abs().sum() == 0
