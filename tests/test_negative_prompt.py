"""sampling.negative_prompt: the unconditional branch of classifier-free guidance is the negative prompt's
embedding, in sampling and in the trained log-probabilities alike."""

from __future__ import annotations

import pytest
import torch

from loopdiff.config import ConfigError, SamplingConfig
from loopdiff.models import build_policies, denoiser
from trainer_helpers import make_trainer

NEGATIVE = "a blurry grey picture"


def _clip_states(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's states of ``prompt``, as StableDiffusionPipeline encodes a negative prompt."""
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids)[0]


def test_unconditional_embedding_is_the_negative_prompts_and_sampling_used_it(tmp_path) -> None:
    trainer = make_trainer(tmp_path, "ppo", sampling={"negative_prompt": NEGATIVE})
    torch.testing.assert_close(trainer.uncond, _clip_states(trainer.pipeline, NEGATIVE), rtol=0, atol=0)
    assert not torch.allclose(trainer.uncond, _clip_states(trainer.pipeline, ""))

    traj, _ = trainer.loop.collect(0)[:2]
    i = torch.arange(len(traj))
    j = torch.zeros(len(traj), dtype=torch.long)
    latents, following = traj.latents[i, j], traj.latents[i, j + 1]
    t, embeds = traj.timesteps[j], traj.prompt_embeds[i]

    def log_prob(uncond: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return trainer.train_policy.step(latents, t, embeds, uncond, next_latents=following).log_prob

    torch.testing.assert_close(log_prob(trainer.uncond), traj.log_probs[:, 0], rtol=1e-5, atol=1e-5)
    empty = log_prob(_clip_states(trainer.pipeline, ""))
    assert (empty - traj.log_probs[:, 0]).abs().max() > 1e-3  # the samples were drawn with the negative prompt


def test_sdxl_negative_prompt_replaces_the_zero_embedding(tiny_sdxl_dir) -> None:
    from loopdiff.config import ModelConfig
    from loopdiff.models import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sdxl_dir)))
    sampling = SamplingConfig(num_steps=2, negative_prompt=NEGATIVE)
    _, _, encoder = build_policies(pipe, denoiser(pipe), denoiser(pipe), sampling, torch.device("cpu"))
    sequence, _, pooled, _ = pipe.encode_prompt(prompt=[NEGATIVE], device="cpu", do_classifier_free_guidance=False)
    uncond = encoder.unconditional()
    torch.testing.assert_close(uncond.sequence, sequence, rtol=0, atol=0)
    torch.testing.assert_close(uncond.pooled, pooled, rtol=0, atol=0)
    _, _, plain = build_policies(pipe, denoiser(pipe), denoiser(pipe), SamplingConfig(num_steps=2), "cpu")
    assert float(plain.unconditional().sequence.abs().max()) == 0.0  # force_zeros_for_empty_prompt, as before


def test_flux_refuses_a_negative_prompt() -> None:
    from tiny_pipelines import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline()
    sampling = SamplingConfig(num_steps=2, negative_prompt=NEGATIVE, resolution=32)
    with pytest.raises(ConfigError, match="sampling.negative_prompt='a blurry grey picture' is not used by a Flux"):
        build_policies(pipe, denoiser(pipe), denoiser(pipe), sampling, torch.device("cpu"))
