"""Sample-prompt parsing (kohya options) and the preview sampler on a toy denoiser."""
from __future__ import annotations

import pytest
import torch

from lora_lab.training.run.loop import DiffusionObjective
from lora_lab.training.run.sampling import SamplePrompt, euler_sample, parse_sample_prompts, sampling_sigmas


def test_prompts_with_kohya_options():
    prompts = parse_sample_prompts("a cat --n ugly, blurry --w 768 --h 512 --d 42 --l 6.5 --s 25\n\n# note\na dog",
                                   resolution=512, seed=7)
    assert prompts == [SamplePrompt("a cat", "ugly, blurry", 768, 512, 42, 6.5, 25),
                       SamplePrompt("a dog", "", 512, 512, 7, 7.0, 20)]


def test_video_prompts_take_a_frame_count():
    """musubi-tuner's --f: a video model's clip length (4n+1), the family's preview length by default."""
    prompts = parse_sample_prompts("a wave --f 9 --w 64 --h 32\na dog", resolution=48, seed=1, frames=17)
    assert [(prompt.frames, prompt.width, prompt.height) for prompt in prompts] == [(9, 64, 32), (17, 48, 48)]
    with pytest.raises(ValueError, match="--f 8 must be 4n\\+1 frames.*use 5"):
        parse_sample_prompts("a wave --f 8", resolution=48, seed=1, frames=17)
    with pytest.raises(ValueError, match="'--f' \\(frames\\) applies to video models"):
        parse_sample_prompts("a cat --f 9", resolution=512, seed=0)
    assert parse_sample_prompts("a cat", resolution=512, seed=0)[0].frames == 1


@pytest.mark.parametrize("text,fragment", [("a cat --x 1", "'--x' is not a sample option"),
                                           ("a cat --w big", "'--w big' needs a number"),
                                           ("a cat --w 100", "must be multiples of 8"),
                                           ("a cat --s 0", "--s 0 must be 1..150")])
def test_bad_prompt_options_name_the_line_and_fix(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_sample_prompts("ok\n" + text, resolution=512, seed=0)


def toy_objective(target: torch.Tensor) -> DiffusionObjective:
    """A perfect denoiser for a single known image: x0_hat = target whatever x_t is."""
    sigmas = torch.linspace(0.03, 14.6, 1000)
    return DiffusionObjective(sigmas=sigmas, prediction_type="epsilon",
                              denoise=lambda xt, sigma, cond: target.expand_as(xt) * cond["scale"],
                              noise_scaling=lambda sigma, noise, x0: x0 + sigma.view(-1, 1, 1, 1) * noise)


def test_euler_reaches_the_denoised_image_and_applies_guidance():
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    objective = toy_objective(target)
    sigmas = sampling_sigmas(objective, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == 0 and torch.all(sigmas[:-1] >= sigmas[1:])
    generator = torch.Generator().manual_seed(0)
    result = euler_sample(objective, {"scale": 1.0}, {"scale": 1.0}, (1, 4, 8, 8), 10, 7.0, generator,
                          torch.device("cpu"))
    assert torch.allclose(result, target, atol=1e-5)
    # cfg 3 with uncond predicting 0: the final image is 3 x target.
    guided = euler_sample(objective, {"scale": 1.0}, {"scale": 0.0}, (1, 4, 8, 8), 10, 3.0,
                          torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.allclose(guided, 3 * target, atol=1e-4)
