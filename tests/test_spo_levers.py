"""SPO's signal and stability levers (backend/train/spo_levers.py) against hand computations."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from spo_studio.backend import diffusion
from spo_studio.backend.config import load_config
from spo_studio.backend.train.spo import SPOConfig, spo_loss
from spo_studio.backend.train.spo_levers import (
    Groups,
    advantage_loss,
    balance_reference,
    gradient_scale,
    group_advantages,
    transition_kl,
)


def _scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def test_two_candidate_group_is_spo_eq_10():
    """k = 2: the advantages are ±1 and the group loss is the pair loss, value and gradient."""
    scores = torch.tensor([[0.3, -1.2], [2.0, 5.0]])
    adv = group_advantages(scores)
    assert adv.tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    lp = torch.tensor([[-1.00, -1.02], [-2.00, -1.95]], requires_grad=True)
    ref = torch.tensor([[-1.03, -1.00], [-2.01, -2.00]])
    group, _ = advantage_loss(lp, ref, adv, beta=10.0, clip_range=0.1)
    group.backward()
    # the same pools as (winner, loser) pairs: pool 1's winner is its second candidate
    lp2 = lp.detach().clone().requires_grad_(True)
    pair, _ = spo_loss(torch.stack([lp2[0, 0], lp2[1, 1]]), torch.stack([lp2[0, 1], lp2[1, 0]]),
                       torch.stack([ref[0, 0], ref[1, 1]]), torch.stack([ref[0, 1], ref[1, 0]]), 10.0, 0.1)
    pair.backward()
    assert group.item() == pytest.approx(pair.item(), abs=1e-7)
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-7)


def test_group_loss_equals_hand_computation():
    scores = torch.tensor([[1.0, 2.0, 4.0]])
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    adv = group_advantages(scores)
    assert adv[0].tolist() == pytest.approx([(s - mean) / std for s in (1.0, 2.0, 4.0)], abs=1e-6)
    log_r = [0.02, -0.3, 0.04]  # the second leaves the clamp: log(0.9) = −0.1054
    lp = torch.tensor([log_r])
    loss, stats = advantage_loss(lp, torch.zeros(1, 3), adv, beta=10.0, clip_range=0.1)
    clamped = [0.02, math.log(0.9), 0.04]
    z = 10 * sum(a * r for a, r in zip(adv[0].tolist(), clamped))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-6)
    assert stats["clamped"] == 1.0
    assert group_advantages(torch.tensor([[3.0, 3.0, 3.0]])).tolist() == [[0.0, 0.0, 0.0]]


def test_balance_scale_weights_the_loss_and_keeps_the_mean_denominator():
    lw, ll = torch.tensor([0.01, -0.02]), torch.tensor([-0.01, 0.0])
    zero = torch.zeros(2)
    plain, _ = spo_loss(lw, ll, zero, zero, 10.0, 0.1)
    per = [math.log(1 + math.exp(-10 * (a - b))) for a, b in zip(lw.tolist(), ll.tolist())]
    assert plain.item() == pytest.approx(sum(per) / 2, abs=1e-6)
    scaled, _ = spo_loss(lw, ll, zero, zero, 10.0, 0.1, weight=torch.ones(2), scale=torch.tensor([2.0, 0.5]))
    assert scaled.item() == pytest.approx((2 * per[0] + 0.5 * per[1]) / 2, abs=1e-6)


def test_gradient_scale_is_the_derivative_of_the_step_mean():
    """g_t = |∂μ/∂ε̂|/σ_t, checked by autograd through DDIM eq. 9 and 12 with scalars."""
    sched = _scheduler()
    grid = diffusion.timesteps(sched, 20)
    prev = [diffusion.prev_timestep(sched, t, 20) for t in grid]
    g = gradient_scale(sched, torch.tensor(grid), torch.tensor(prev), eta=1.0)
    for t, tp, gt in zip(grid, prev, g.tolist()):
        a_t, a_p = diffusion.alpha_bar(sched, t), diffusion.alpha_bar(sched, tp)
        sigma = diffusion.ddim_sigma(a_t, a_p, 1.0)
        eps = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        x_t = torch.tensor(0.7, dtype=torch.float64)
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        mu = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps
        mu.backward()
        assert gt == pytest.approx(abs(eps.grad.item()) / sigma, rel=1e-4), t
    by_t = dict(zip(grid, g.tolist()))
    # the imbalance the lever corrects: the last steps' pairs outweigh the middle ones several times
    assert by_t[51] / by_t[501] > 5 and 0.4 < by_t[501] < 1.0
    ref = balance_reference(sched, 20, 4, 1.0)
    assert ref == pytest.approx(sum(g.tolist()[4:]) / 16, rel=1e-6)


def test_transition_kl_is_the_expected_log_ratio():
    """KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) per element = (μ_θ−μ_ref)²/(2σ²) = E_{x~p_θ}[log p_θ(x) − log p_ref(x)]."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 8, 8, generator=gen)
    ref = mean + 0.05 * torch.randn(2, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.2, 0.5])
    kl = transition_kl(mean, ref, sigma)
    hand = [((mean[i] - ref[i]) ** 2).mean().item() / (2 * s**2) for i, s in enumerate(sigma.tolist())]
    assert kl.tolist() == pytest.approx(hand, rel=1e-5)
    draws = [mean + sigma.view(-1, 1, 1, 1) * torch.randn(mean.shape, generator=gen) for _ in range(400)]
    mc = torch.stack([diffusion.transition_log_prob_tensor(x, mean, sigma)
                      - diffusion.transition_log_prob_tensor(x, ref, sigma) for x in draws]).mean(0)
    assert mc.tolist() == pytest.approx(kl.tolist(), rel=0.05)


def test_groups_round_trip_and_index():
    g = Groups(x_t=torch.randn(3, 4, 2, 2), x=torch.randn(3, 5, 4, 2, 2), adv=torch.randn(3, 5),
               t=torch.tensor([9, 8, 7]), t_prev=torch.tensor([8, 7, 6]), prompts=["a", "b", "c"])
    back = Groups.from_state(g.to_state())
    sub = Groups.cat([back.index([2]), back.index(torch.tensor([0]))])
    assert sub.prompts == ["c", "a"] and torch.equal(sub.x[0], g.x[2]) and torch.equal(sub.adv[1], g.adv[0])
    assert len(Groups.empty()) == 0


def test_lever_fields_are_validated():
    for bad in ("pair_mode=all", "kl_coef=-1", "trunk=eta0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            load_config(SPOConfig, None, [bad]).validate()
    cfg = load_config(SPOConfig, None, [])
    assert (cfg.pair_mode, cfg.timestep_balance, cfg.kl_coef, cfg.fp32_candidates, cfg.trunk) == (
        "best-worst", False, 0.0, False, "candidate")


def test_fp32_candidates_keep_bf16_rounding_out_of_the_targets(tiny_dirs, tiny_spm, prompts_file):
    """With a bf16 UNet the paper's rollout stores bf16-rounded candidates; `fp32_candidates` does not."""
    from spo_studio.backend.models import load_model
    from spo_studio.backend.rewards import step_scorer
    from spo_studio.backend.train.spo import rollout

    model = load_model(tiny_dirs["sd15"], device="cpu", dtype=torch.bfloat16)
    scorer = step_scorer("reward:brightness", model, "x0", 100.0)
    found = {}
    for fp32 in (False, True):
        cfg = load_config(SPOConfig, None, [f"fp32_candidates={fp32}", "num_steps=4", "divert_start_step=1",
                                            "threshold=0", "pool_size=3"])
        pairs, _ = rollout(model, model.unet, scorer, ["a red circle", "a blue square"], cfg,
                           torch.Generator().manual_seed(0))
        assert len(pairs) > 0
        found[fp32] = torch.equal(pairs.x_w, pairs.x_w.bfloat16().float())
    assert found == {False: True, True: False}


def test_ddim_trunk_draws_its_pairs_at_the_deterministic_sampler_states(tiny_dirs):
    """`trunk: ddim`: every pair's x_t is a state of DDIM η = 0 from the same x_T, and the pools around it are
    drawn at η = 1 (candidates spread by σ_t); the paper's trunk (η = 1 from the first step) is off that path."""
    from spo_studio.backend.models import load_model
    from spo_studio.backend.rewards import step_scorer
    from spo_studio.backend.train.spo import rollout

    model = load_model(tiny_dirs["sd15"], device="cpu", dtype=torch.float32)
    scorer = step_scorer("reward:brightness", model, "x0", 100.0)
    prompts = ["a red circle", "a blue square"]
    x_T = diffusion.initial_latents(model, len(prompts), generator=torch.Generator().manual_seed(0))
    states = {s.t: s.x_t for s in diffusion.sample(model, prompts, num_steps=6, cfg_scale=5.0, eta=0.0,
                                                    latents=x_T).steps}
    for trunk, on_path in (("ddim", True), ("candidate", False)):
        cfg = load_config(SPOConfig, None, [f"trunk={trunk}", "num_steps=6", "divert_start_step=2", "threshold=0",
                                            "pool_size=3"])
        pairs, _ = rollout(model, model.unet, scorer, prompts, cfg, torch.Generator().manual_seed(0))
        assert len(pairs) == 2 * 4  # every pool a pair: 4 pooled steps × 2 prompts
        gaps = [(pairs.x_t[i] - states[int(pairs.t[i])][prompts.index(pairs.prompts[i])]).abs().max().item()
                for i in range(len(pairs))]
        assert (max(gaps) < 1e-5) if on_path else (min(gaps) > 0.05)
        sigma = diffusion.ddim_sigma_tensor(*(diffusion.alpha_bar_tensor(model.scheduler, t)
                                              for t in (pairs.t, pairs.t_prev)), 1.0)
        assert ((pairs.x_w - pairs.x_l).flatten(1).std(1) > 0.5 * sigma).all()


def test_the_studio_form_offers_the_levers():
    from spo_studio.webui.form import field_specs

    specs = {s.name: s for s in field_specs(SPOConfig)}
    assert specs["pair_mode"].kind == "choice" and specs["pair_mode"].choices == ["best-worst", "group"]
    assert specs["timestep_balance"].kind == "bool" and specs["kl_coef"].kind == "float"
    assert specs["fp32_candidates"].kind == "bool" and specs["reward_mode"].choices == ["x0", "complete"]
    assert specs["trunk"].kind == "choice" and specs["trunk"].choices == ["candidate", "ddim"]
