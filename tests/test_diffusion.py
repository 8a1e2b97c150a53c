"""The DDIM-η step core against diffusers' pipelines and hand computations."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from spo_studio.backend import diffusion as D
from spo_studio.backend.models import load_model

PROMPTS = ["a red circle on a blue background", "a photo of a cat"]


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {fam: load_model(path) for fam, path in tiny_dirs.items()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_eta0_reproduces_diffusers_pipeline(models, tiny_dirs, family):
    model = models[family]
    latents = D.initial_latents(model, len(PROMPTS), generator=torch.Generator().manual_seed(7))
    ours = D.sample(model, PROMPTS, num_steps=20, cfg_scale=5.0, eta=0.0, latents=latents).latents

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"safety_checker": None} if family == "sd15" else {}
    pipe = cls.from_pretrained(tiny_dirs[family], local_files_only=True, **extra)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, eta=0.0, latents=latents.clone(),
                  output_type="latent").images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_timestep_grid_is_spo_grid(models):
    assert D.timesteps(models["sd15"].scheduler, 20) == list(range(951, 0, -50))


def test_sigma_matches_paper_formula_and_diffusers_variance(models):
    sched = models["sd15"].scheduler
    t, t_prev = 951, 901
    a_t, a_prev = D.alpha_bar(sched, t), D.alpha_bar(sched, t_prev)
    # DDIM eq. 16 written out by hand, η = 1: the DDPM posterior std.
    expected = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    assert D.ddim_sigma(a_t, a_prev, 1.0) == pytest.approx(expected, rel=1e-12)
    sched.set_timesteps(20)
    assert D.ddim_sigma(a_t, a_prev, 1.0) == pytest.approx(float(sched._get_variance(t, t_prev)) ** 0.5, rel=1e-5)
    assert D.ddim_sigma(a_t, a_prev, 0.5) == pytest.approx(0.5 * expected)
    # the last step goes to ᾱ = final_alpha_cumprod (set_alpha_to_one=False → ᾱ_0)
    assert D.alpha_bar(sched, -49) == pytest.approx(float(sched.alphas_cumprod[0]))


def test_eta1_step_matches_diffusers_ddim_step(models):
    """With η = 1 and the same z, our draw equals DDIMScheduler.step (variance_noise given)."""
    model = models["sd15"]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    cond = model.encode_prompts(PROMPTS)
    neg = model.encode_negative(2)
    pred = D.predict(model, x_t, 501, 451, cond, neg, 5.0)
    z = torch.randn(x_t.shape, generator=g)
    ours = D.draw(pred, z, eta=1.0)
    sched = model.scheduler
    sched.set_timesteps(20)
    theirs = sched.step(pred.eps, 501, x_t, eta=1.0, variance_noise=z).prev_sample
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (
        pred.x0_hat - sched.step(pred.eps, 501, x_t, eta=1.0, variance_noise=z).pred_original_sample
    ).abs().max() < 1e-5


def test_transition_log_prob_equals_torch_normal(models):
    model = models["sd15"]
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 16, 16, generator=g)
    cond = model.encode_prompts(["a red circle", "a cat", "a green square"])
    pred = D.predict(model, x_t, 751, 701, cond, model.encode_negative(3), 5.0)
    sigma = pred.sigma(1.0)
    mean = pred.mean(1.0)
    x_prev = D.draw(pred, torch.randn(x_t.shape, generator=g), 1.0)
    ours = D.transition_log_prob(x_prev, mean, sigma)
    hand = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert ours.shape == (3,)
    assert torch.allclose(ours, hand, atol=1e-5, rtol=0)
    # a point at the mean: −log σ − ½ log 2π exactly
    at_mean = D.transition_log_prob(mean, mean, sigma)
    assert torch.allclose(at_mean, torch.full((3,), -math.log(sigma) - 0.5 * math.log(2 * math.pi)), atol=1e-6)
    with pytest.raises(ValueError, match="sigma_t > 0"):
        D.transition_log_prob(x_prev, mean, 0.0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pool_shares_mean_and_costs_one_unet_call(models, family):
    model = models[family]
    calls = []
    handle = model.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        pred = D.predict(model, x_t, 651, 601, model.encode_prompts(PROMPTS), model.encode_negative(2), 5.0)
        pool = D.sample_pool(pred, k=4, eta=1.0, generator=torch.Generator().manual_seed(4))
    finally:
        handle.remove()
    assert len(calls) == 1  # CFG halves batched into the same single call
    assert pool.candidates.shape == (2, 4, 4, 16, 16)
    # every candidate is μ + σ·z with the shared μ, exactly
    residual = pool.candidates - pool.mean[:, None]
    assert torch.equal(residual, pool.candidates - pool.mean[:, None])
    assert torch.allclose(residual, pool.sigma * pool.noise, atol=1e-6)
    assert torch.allclose(pool.candidates[:, 0] - pool.sigma * pool.noise[:, 0], pool.mean, atol=1e-6)
    assert not torch.allclose(pool.candidates[:, 0], pool.candidates[:, 1])
    # the pool's log-probs are the per-candidate Gaussian log-densities
    lp = pool.log_prob()
    hand = torch.distributions.Normal(pool.mean[:, None], pool.sigma).log_prob(pool.candidates).mean(dim=(2, 3, 4))
    assert torch.allclose(lp, hand, atol=1e-5)
    with pytest.raises(ValueError, match="eta > 0"):
        D.sample_pool(pred, k=4, eta=0.0)


def test_trajectory_records_every_step(models):
    model = models["sdxl"]
    seen = []
    traj = D.sample(model, PROMPTS[:1], num_steps=5, eta=1.0, generator=torch.Generator().manual_seed(0),
                    callback=lambda i, rec: seen.append(i))
    assert traj.timesteps == [801, 601, 401, 201, 1]
    assert seen == [0, 1, 2, 3, 4]
    for a, b in zip(traj.steps, traj.steps[1:]):
        assert torch.equal(a.x_prev, b.x_t)
        assert a.t_prev == b.t
    assert torch.equal(traj.steps[-1].x_prev, traj.latents)
    # x̂0 is consistent with x_t and ε̂ (DDIM eq. 9)
    s = traj.steps[2]
    a_t = D.alpha_bar(model.scheduler, s.t)
    assert torch.allclose(s.x_t, math.sqrt(a_t) * s.x0_hat + math.sqrt(1 - a_t) * s.eps, atol=1e-5)


def test_seeded_sampling_is_reproducible(models):
    model = models["sd15"]
    a = D.sample(model, PROMPTS, num_steps=4, generator=torch.Generator().manual_seed(5), record=False).latents
    b = D.sample(model, PROMPTS, num_steps=4, generator=torch.Generator().manual_seed(5), record=False).latents
    assert torch.equal(a, b)
