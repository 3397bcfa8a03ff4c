"""objective.py against an independent float64 computation written with explicit loops."""

import math

import pytest
import torch

from iq_lightning import objective
from iq_lightning.objective import estimated_optimal_logprobs, inverse_q_loss, sampled_token_targets, token_credit


def ref_log_pi_hat(logits_w: list[float], logits_l: list[float], alpha: float) -> list[float]:
    """pi_hat(v) = pi_w(v)^alpha * pi_l(v)^(1-alpha) / Z, with explicit softmaxes."""

    def softmax(xs):
        m = max(xs)
        exps = [math.exp(x - m) for x in xs]
        total = sum(exps)
        return [e / total for e in exps]

    pw, pl = softmax(logits_w), softmax(logits_l)
    unnorm = [pw[v] ** alpha * pl[v] ** (1 - alpha) for v in range(len(pw))]
    z = sum(unnorm)
    return [math.log(u / z) for u in unnorm]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.4, 2.5])
def test_estimated_optimal_logprobs_matches_explicit_product_of_experts(alpha):
    g = torch.Generator().manual_seed(1)
    lw = torch.randn(2, 3, 11, generator=g) * 3
    ll = torch.randn(2, 3, 11, generator=g) * 3
    got = estimated_optimal_logprobs(lw, ll, alpha)
    assert got.shape == (2, 3, 11)
    for i in range(2):
        for t in range(3):
            want = ref_log_pi_hat(lw[i, t].double().tolist(), ll[i, t].double().tolist(), alpha)
            assert got[i, t].double().tolist() == pytest.approx(want, abs=1e-5)


def test_alpha_one_gives_pi_w():
    g = torch.Generator().manual_seed(2)
    lw, ll = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(estimated_optimal_logprobs(lw, ll, 1.0), torch.log_softmax(lw, -1))


def test_output_is_normalised_and_float32_for_bf16_inputs():
    g = torch.Generator().manual_seed(3)
    lw = torch.randn(5, 13, generator=g).bfloat16()
    ll = torch.randn(5, 13, generator=g).bfloat16()
    out = estimated_optimal_logprobs(lw, ll, 1.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(5))


@pytest.mark.parametrize("chunk_rows", [1, 2, 256])
def test_sampled_token_targets_gathers_pi_hat_of_the_tokens(monkeypatch, chunk_rows):
    monkeypatch.setattr(objective, "_TARGET_CHUNK_ROWS", chunk_rows)
    g = torch.Generator().manual_seed(4)
    lw = torch.randn(3, 5, 17, generator=g) * 2
    ll = torch.randn(3, 5, 17, generator=g) * 2
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    got = sampled_token_targets(lw, ll, tokens, 1.4)
    assert got.shape == (3, 5)
    for i in range(3):
        for t in range(5):
            want = ref_log_pi_hat(lw[i, t].double().tolist(), ll[i, t].double().tolist(), 1.4)[tokens[i, t]]
            assert got[i, t].item() == pytest.approx(want, abs=1e-5)


def test_sampled_token_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        sampled_token_targets(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), 1.0)


def _loss_by_loops(policy, target, mask, reduction):
    per_seq_sum, per_seq_n = [], []
    for i in range(len(policy)):
        s = sum(mask[i][t] * (target[i][t] - policy[i][t]) ** 2 for t in range(len(policy[i])))
        per_seq_sum.append(s)
        per_seq_n.append(sum(mask[i]))
    if reduction == "sum":
        return sum(per_seq_sum)
    if reduction == "token_mean":
        return sum(per_seq_sum) / sum(per_seq_n)
    means = [s / n for s, n in zip(per_seq_sum, per_seq_n) if n > 0]
    return sum(means) / len(means)


@pytest.mark.parametrize("reduction", ["sum", "token_mean", "sequence_mean"])
def test_inverse_q_loss_reductions_with_padding(reduction):
    policy = [[-1.0, -2.0, -0.5, 9.0], [-3.0, 7.0, 7.0, 7.0], [5.0, 5.0, 5.0, 5.0]]
    target = [[-1.5, -1.0, -0.5, -99.0], [-2.0, 42.0, 42.0, 42.0], [0.0, 0.0, 0.0, 0.0]]
    # Row 0: 3 tokens (EOS included), row 1: 1 token, row 2: an empty response; padding holds junk.
    mask = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    got = inverse_q_loss(torch.tensor(policy), torch.tensor(target), torch.tensor(mask), reduction)
    assert got.item() == pytest.approx(_loss_by_loops(policy, target, mask, reduction), rel=1e-6)


def test_inverse_q_loss_exact_values_and_gradient():
    policy = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[-2.0, -2.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = inverse_q_loss(policy, target, mask, "token_mean")
    assert loss.item() == pytest.approx((1.0 + 0.25) / 2)
    loss.backward()
    # d/dp mean_t (t - p)^2 = -2 (t - p) / N on masked tokens, 0 on padding.
    torch.testing.assert_close(policy.grad, torch.tensor([[1.0, 0.5, 0.0]]))


def test_inverse_q_loss_unknown_reduction():
    with pytest.raises(ValueError, match="token_mean"):
        inverse_q_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "mean")


def test_token_credit():
    credit = token_credit(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=0.5)
    torch.testing.assert_close(credit, torch.tensor([0.25, -0.5]))


# --- the open choices (issue 24): hand-computed values -------------------------------------------


def test_huber_penalty_hand_values_and_bounded_gradient():
    from iq_lightning.objective import residual_penalty

    r = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    # delta 1: r^2 inside, 2|r| - 1 beyond: 3 -> 5, 2 -> 3
    got = residual_penalty(r, "huber", 1.0)
    assert got.tolist() == pytest.approx([5.0, 1.0, 0.25, 0.0, 0.25, 3.0])
    got.sum().backward()
    assert r.grad.tolist() == pytest.approx([-2.0, -2.0, -1.0, 0.0, 1.0, 2.0])  # |grad| <= 2 * delta
    assert residual_penalty(torch.tensor([3.0]), "huber", 0.5).tolist() == pytest.approx([2 * 0.5 * 3 - 0.25])
    assert residual_penalty(r.detach(), "squared").tolist() == pytest.approx([9.0, 1.0, 0.25, 0.0, 0.25, 4.0])
    with pytest.raises(ValueError, match="penalty"):
        residual_penalty(r, "cubic")


def test_inverse_q_loss_with_huber_penalty_hand_value():
    policy = torch.tensor([[-1.0, -2.0, -3.0]])
    target = torch.tensor([[-1.5, -5.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # residuals -0.5 (inside: 0.25) and -3 (beyond: 2 * 1 * 3 - 1 = 5); the third is masked
    assert inverse_q_loss(policy, target, mask, "sum", "huber", 1.0).item() == pytest.approx(5.25)
    assert inverse_q_loss(policy, target, mask, "token_mean", "huber", 1.0).item() == pytest.approx(2.625)
    assert inverse_q_loss(policy, target, mask, "sum").item() == pytest.approx(0.25 + 9.0)  # the paper's squared


def test_clipped_targets_hand_values():
    from iq_lightning.objective import clipped_targets

    target = torch.tensor([-0.5, -9.0, -1.0, -4.0])
    ref = torch.tensor([-2.0, -3.0, -1.2, -4.0])
    # log-ratios 1.5, -6, 0.2, 0 clipped to +-1: ref + (1, -1, 0.2, 0)
    assert clipped_targets(target, ref, 1.0).tolist() == pytest.approx([-1.0, -4.0, -1.0, -4.0])


@pytest.mark.parametrize(
    "alpha, warmup, want",
    [(1.5, 0, [1.5, 1.5, 1.5]), (1.5, 2, [1.0, 1.25, 1.5, 1.5]), (1.3, 3, [1.0, 1.1, 1.2, 1.3, 1.3]), (0.4, 2, [1.0, 0.7, 0.4])],
)
def test_scheduled_alpha_hand_values(alpha, warmup, want):
    from iq_lightning.objective import scheduled_alpha

    assert [scheduled_alpha(alpha, e, warmup) for e in range(len(want))] == pytest.approx(want)


def test_scheduled_alphas_keep_each_principles_share():
    from iq_lightning.objective import scheduled_alphas

    # sum 1.4 warms up from 1.0: epoch 0 scales by 1/1.4, epoch 1 (of 2) by 1.2/1.4
    assert scheduled_alphas([0.8, 0.6], 0, 2) == pytest.approx((0.8 / 1.4, 0.6 / 1.4))
    assert scheduled_alphas([0.8, 0.6], 1, 2) == pytest.approx((0.8 * 1.2 / 1.4, 0.6 * 1.2 / 1.4))
    assert scheduled_alphas([0.8, 0.6], 5, 2) == pytest.approx((0.8, 0.6))
    assert scheduled_alphas([1.5], 1, 2) == pytest.approx((1.25,))


# --- several principles: pi_hat ∝ prod_k pi_w,k^alpha_k * pi_l^(1 - sum_k alpha_k) ---------------


def ref_log_pi_hat_multi(winners: list[list[float]], lesser: list[float], alphas: list[float]) -> list[float]:
    """The product of experts in float64 with explicit softmaxes and powers, as the issue writes it."""

    def softmax(xs):
        m = max(xs)
        exps = [math.exp(x - m) for x in xs]
        return [e / sum(exps) for e in exps]

    pws, pl = [softmax(w) for w in winners], softmax(lesser)
    rest = 1.0 - sum(alphas)
    unnorm = [math.prod(pw[v] ** a for pw, a in zip(pws, alphas)) * pl[v] ** rest for v in range(len(pl))]
    z = sum(unnorm)
    return [math.log(u / z) for u in unnorm]


@pytest.mark.parametrize("alphas", [[0.8, 0.6], [1.0, 0.0], [0.3, 0.5, 0.9], [0.0, 0.0]])
def test_several_winners_match_the_explicit_product_of_experts(alphas):
    g = torch.Generator().manual_seed(7)
    winners = [torch.randn(2, 3, 13, generator=g, dtype=torch.float64) * 3 for _ in alphas]
    lesser = torch.randn(2, 3, 13, generator=g, dtype=torch.float64) * 3
    got = estimated_optimal_logprobs(winners, lesser, alphas)
    assert got.dtype == torch.float64
    tokens = torch.randint(0, 13, (2, 3), generator=g)
    targets = sampled_token_targets(winners, lesser, tokens, alphas)
    for i in range(2):
        for t in range(3):
            want = ref_log_pi_hat_multi([w[i, t].tolist() for w in winners], lesser[i, t].tolist(), alphas)
            assert got[i, t].tolist() == pytest.approx(want, abs=1e-10)
            assert targets[i, t].item() == pytest.approx(want[tokens[i, t]], abs=1e-10)


def test_one_winner_in_a_list_is_bitwise_the_single_principle():
    g = torch.Generator().manual_seed(8)
    lw, ll = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    tokens = torch.randint(0, 9, (3, 4), generator=g)
    assert torch.equal(estimated_optimal_logprobs([lw], ll, [1.3]), estimated_optimal_logprobs(lw, ll, 1.3))
    assert torch.equal(sampled_token_targets([lw], ll, tokens, (1.3,)), sampled_token_targets(lw, ll, tokens, 1.3))
    with pytest.raises(ValueError, match="2 winner guides but 1 alphas"):
        estimated_optimal_logprobs([lw, lw], ll, [1.3])
