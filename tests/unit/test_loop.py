"""The loss pieces (training/run/loop.py), parameter groups and optimizers (optimizers.py) and batching
(feeder.py), without ComfyUI."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from lora_lab.training.data import feeder
from lora_lab.training.lr import optimizers
from lora_lab.training.run import loop


def discrete_schedule():
    """SD's scaled-linear beta schedule: alphas_cumprod and ComfyUI's sigmas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return alphas_cumprod, ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def test_min_snr_weight_matches_diffusers_compute_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    _, sigmas = discrete_schedule()
    sigma = sigmas[timesteps].float()
    expected_epsilon = torch.clamp(snr, max=5.0) / snr
    expected_velocity = torch.clamp(snr, max=5.0) / (snr + 1)
    torch.testing.assert_close(loop.min_snr_weight(sigma, 5.0, "epsilon"), expected_epsilon, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loop.min_snr_weight(sigma, 5.0, "v_prediction"), expected_velocity, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_a_perfect_model_has_zero_loss(kind):
    """Feed the true x0 as the denoised estimate: both parametrisations must give prediction == target."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    _, sigmas = discrete_schedule()
    objective = loop.DiffusionObjective(sigmas=sigmas.float(), prediction_type=kind,
                                        denoise=lambda xt, sigma, cond: x0,
                                        noise_scaling=lambda sigma, n, x: x + sigma.view(-1, 1, 1, 1) * n)
    loss = loop.diffusion_loss(objective, x0, {}, noise, torch.tensor([5, 500, 990]), min_snr_gamma=5.0)
    assert loss.item() < 1e-8
    wrong = loop.DiffusionObjective(sigmas=sigmas.float(), prediction_type=kind,
                                    denoise=lambda xt, sigma, cond: torch.zeros_like(x0),
                                    noise_scaling=objective.noise_scaling)
    assert loop.diffusion_loss(wrong, x0, {}, noise, torch.tensor([5, 500, 990])).item() > 1e-3


def test_param_groups_split_parts_blocks_and_lora_plus():
    def parameter():
        return torch.nn.Parameter(torch.zeros(2, 2))

    layers = [optimizers.TrainedLayer("unet", "down", parameter(), parameter()),
              optimizers.TrainedLayer("unet", "up", parameter(), parameter()),
              optimizers.TrainedLayer("text_encoder", "", parameter(), parameter())]
    groups = optimizers.build_param_groups(layers, {"unet": 1e-4, "text_encoder": 1e-5, "text_encoder_2": 0.0},
                                     lora_plus_ratio=16.0, block_weight={"down": 0.5, "mid": 1.0, "up": 2.0}.get)
    rates = {group["name"]: group["base_lr"] for group in groups}
    assert rates == pytest.approx({"unet/down/A": 0.5e-4, "unet/down/B": 8e-4, "unet/up/A": 2e-4,
                                   "unet/up/B": 32e-4, "text_encoder/A": 1e-5, "text_encoder/B": 16e-5})
    optimizer = optimizers.build_optimizer("AdamW", groups, 0.0)
    assert optimizers.applied_rates(optimizer) == pytest.approx({"unet": 2e-4, "text_encoder": 1e-5})


def test_optimizer_checks_name_the_fix():
    with pytest.raises(ValueError, match="unknown"):
        optimizers.check_optimizer("Adam9000", "cpu")
    with pytest.raises(ValueError, match="NVIDIA|bitsandbytes"):
        optimizers.check_optimizer("AdamW8bit", "cpu")
    optimizers.check_optimizer("AdamW", "cpu")


def test_bucket_batches_never_mix_buckets():
    samples = [SimpleNamespace(bucket=(64, 64) if index < 5 else (64, 128), repeats=1) for index in range(8)]

    class Dataset:
        def __init__(self):
            self.samples = samples

        def epoch_indices(self, rng):
            indices = list(range(len(samples)))
            rng.shuffle(indices)
            return indices

        def buckets(self):
            grouped = {}
            for index, sample in enumerate(samples):
                grouped.setdefault(sample.bucket, []).append(index)
            return grouped

    batches = feeder.bucket_batches(Dataset(), 2, random.Random(0))
    for _ in range(20):
        batch = next(batches)
        assert len(batch) == 2 and len({samples[index].bucket for index in batch}) == 1
    with pytest.raises(ValueError):
        next(feeder.bucket_batches(Dataset(), 6, random.Random(0)))


def reference_loss(prediction, target, loss_type, huber_c):
    """sd-scripts' conditional_loss (library/train_util.py), written out: the formulas the loss follows."""
    c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
    if loss_type == "l1":
        return (prediction - target).abs()
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((prediction - target) ** 2 + c ** 2) - c)
    return 2 * (torch.sqrt((prediction - target) ** 2 + c ** 2) - c)


@pytest.mark.parametrize("kind", ["huber", "smooth_l1", "l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_robust_losses_follow_sd_scripts(kind, schedule):
    """Each loss and huber schedule against sd-scripts' formulas, on a discrete (VP) schedule whose sigma is
    sqrt((1 - alphas_cumprod) / alphas_cumprod) and on flow matching (sigma / (1 - sigma) its noise ratio)."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    guess = torch.randn(3, 4, 8, 8, generator=generator)
    settings = loop.LossSettings(kind, 0.2, schedule)
    alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000)
    discrete_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    for prediction_type, sigmas, chosen in (("epsilon", discrete_sigmas, discrete_sigmas[[10, 500, 990]]),
                                            ("flow", torch.linspace(0.001, 1, 1000), torch.tensor([0.05, 0.5, 0.95]))):
        objective = loop.DiffusionObjective(
            sigmas=sigmas, prediction_type=prediction_type, denoise=lambda xt, s, cond: guess,
            noise_scaling=(lambda s, n, x: x + s.view(-1, 1, 1, 1) * n) if prediction_type == "epsilon" else
            (lambda s, n, x: (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * n))
        xt = objective.noise_scaling(chosen, noise, x0)
        prediction, target = loop.PREDICTIONS[prediction_type](xt, guess, x0, noise, chosen)
        if schedule == "constant":
            c = torch.full((3,), 0.2)
        elif schedule == "exponential":   # exp(-alpha t), alpha = -ln(c) / 1000, t the timestep
            timesteps = torch.tensor([10.0, 500.0, 990.0]) if prediction_type == "epsilon" else chosen * 1000
            c = torch.exp(math.log(0.2) / 1000 * timesteps)
        else:
            ratio = chosen if prediction_type == "epsilon" else chosen / (1 - chosen)
            c = (1 - 0.2) / (1 + ratio) ** 2 + 0.2
        expected = reference_loss(prediction, target, kind, c).mean()
        got = loop.loss_at_sigma(objective, x0, {}, noise, chosen, loss=settings)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    mse = loop.loss_at_sigma(objective, x0, {}, noise, chosen)
    assert float(mse) == pytest.approx(float(((prediction - target) ** 2).mean()), rel=1e-5)
