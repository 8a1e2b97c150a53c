"""SPO's loss, clamp, pair selection and log-probabilities against hand computations."""

import math

import pytest
import torch
from spo_studio.backend import diffusion as D
from spo_studio.backend.train.spo import SPOConfig, select_pairs, spo_loss


def _hand_loss(lw, ll, rw, rl, beta, eps):
    def clamp(x):
        return min(max(x, 1 - eps), 1 + eps)

    out = []
    for a, b, c, d in zip(lw, ll, rw, rl):
        r_w = clamp(math.exp(a - c))
        r_l = clamp(math.exp(b - d))
        z = beta * (math.log(r_w) - math.log(r_l))
        out.append(-math.log(1 / (1 + math.exp(-z))))
    return sum(out) / len(out)


def test_spo_loss_equals_hand_computation():
    lw = torch.tensor([-1.00, -2.00, -0.50])
    ll = torch.tensor([-1.02, -1.95, -0.80])
    rw = torch.tensor([-1.03, -2.01, -0.40])
    rl = torch.tensor([-1.00, -2.00, -0.70])
    loss, stats = spo_loss(lw, ll, rw, rl, beta=10.0, clip_range=0.1)
    assert loss.item() == pytest.approx(
        _hand_loss(lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist(), 10.0, 0.1), abs=1e-6
    )
    # pair 0 by hand: r_w = e^0.03 = 1.03046, r_l = e^-0.02 = 0.98020 → z = 10·(0.03 + 0.02) = 0.5
    single, _ = spo_loss(lw[:1], ll[:1], rw[:1], rl[:1], 10.0, 0.1)
    assert single.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-6)
    assert stats["ratio_w"] == pytest.approx(
        sum(min(max(math.exp(a - c), 0.9), 1.1) for a, c in zip(lw.tolist(), rw.tolist())) / 3, abs=1e-6
    )


def test_clamp_bounds_and_zero_gradient_outside():
    # ratio_w = e^0.5 = 1.65 > 1.1 → clamped to 1.1; ratio_l = e^-0.5 = 0.61 < 0.9 → 0.9
    lw = torch.tensor([0.5], requires_grad=True)
    ll = torch.tensor([-0.5], requires_grad=True)
    loss, stats = spo_loss(lw, ll, torch.zeros(1), torch.zeros(1), beta=10.0, clip_range=0.1)
    assert stats["ratio_w"] == pytest.approx(1.1) and stats["ratio_l"] == pytest.approx(0.9)
    assert stats["clamped"] == 1.0
    z = 10 * (math.log(1.1) - math.log(0.9))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-6)
    loss.backward()
    assert lw.grad.item() == 0.0 and ll.grad.item() == 0.0  # no gradient once the ratio left [1-ε, 1+ε]
    # inside the bounds the gradient flows: d/dlw of −log σ(β(lw−ll)) at 0 = −β/2
    lw2 = torch.tensor([0.0], requires_grad=True)
    loss2, stats2 = spo_loss(lw2, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=10.0, clip_range=0.1)
    assert stats2["clamped"] == 0.0
    # one pair of three outside the bounds (only r_l), one padding pair outside too: 1/3 of the real pairs
    _, stats3 = spo_loss(torch.tensor([0.0, 0.05, 0.0, 0.5]), torch.tensor([0.0, -0.2, 0.01, 0.0]), torch.zeros(4),
                         torch.zeros(4), beta=10.0, clip_range=0.1, weight=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert stats3["clamped"] == pytest.approx(1 / 3)
    loss2.backward()
    assert lw2.grad.item() == pytest.approx(-5.0)
    assert loss2.item() == pytest.approx(math.log(2))


def test_padding_weight_excludes_pairs():
    lw, ll = torch.tensor([0.05, 0.0]), torch.tensor([0.0, 0.0])
    zero = torch.zeros(2)
    masked, _ = spo_loss(lw, ll, zero, zero, 10.0, 0.1, weight=torch.tensor([1.0, 0.0]))
    only, _ = spo_loss(lw[:1], ll[:1], zero[:1], zero[:1], 10.0, 0.1)
    assert masked.item() == pytest.approx(only.item())


def test_pair_selection_and_threshold():
    scores = torch.tensor([[20.0, 21.0, 19.5, 20.2],    # gap 1.5 → tanh(0.75) = 0.635 > 0.3: kept
                           [20.0, 20.3, 20.1, 20.2],    # gap 0.3 → tanh(0.15) = 0.149: dropped
                           [22.0, 21.0, 21.0, 21.3]])   # gap 1.0 → tanh(0.5) = 0.462: kept
    win, lose, keep = select_pairs(scores, threshold=0.3)
    assert win.tolist() == [1, 1, 0]
    assert lose.tolist() == [2, 0, 1]
    assert keep.tolist() == [True, False, True]
    # the threshold is on the softmax gap p_w − p_l: s_w − s_l > 2·atanh(thr) = 0.619 for 0.3
    edge = torch.tensor([[0.0, 2 * math.atanh(0.3) + 1e-3], [0.0, 2 * math.atanh(0.3) - 1e-3]])
    assert select_pairs(edge, 0.3)[2].tolist() == [True, False]
    p = torch.softmax(torch.tensor([1.5, 0.0]), 0)
    assert (p[0] - p[1]).item() == pytest.approx(math.tanh(0.75))


def test_tensor_step_math_matches_scalar_version():
    from tiny_models import tiny_sd15

    sched = tiny_sd15().scheduler
    t = torch.tensor([951, 501, 1])
    t_prev = torch.tensor([901, 451, -49])
    a_t, a_prev = D.alpha_bar_tensor(sched, t), D.alpha_bar_tensor(sched, t_prev)
    sig = D.ddim_sigma_tensor(a_t, a_prev, 1.0)
    for i in range(3):
        assert a_prev[i].item() == pytest.approx(D.alpha_bar(sched, int(t_prev[i])))
        assert sig[i].item() == pytest.approx(
            D.ddim_sigma(D.alpha_bar(sched, int(t[i])), D.alpha_bar(sched, int(t_prev[i])), 1.0)
        )
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    mean = D.ddim_mean_tensor(x0, eps, a_prev, sig)
    x = mean + sig.view(-1, 1, 1, 1).float() * torch.randn(3, 4, 8, 8)
    lp = D.transition_log_prob_tensor(x, mean, sig)
    for i in range(3):
        hand = torch.distributions.Normal(mean[i], sig[i].item()).log_prob(x[i]).mean()
        assert lp[i].item() == pytest.approx(hand.item(), abs=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match=r"pool_size must lie in \[2, 64\]"):
        SPOConfig(pool_size=1).validate()
    with pytest.raises(ValueError, match="SPO needs eta > 0"):
        SPOConfig(eta=0.0).validate()
    SPOConfig().validate()
