"""Held-out evaluator and VQA reward on VAE round trips of renders, one texture at a time.

Renders a scene for each of the 60 color validation prompts with every object given the same texture,
passes it through the pipeline's VAE (as a generated image would) and scores it.

    python texture_check.py [pipeline folder]   # default: the shipped embedded pipeline
"""

import sys
from dataclasses import replace

import numpy as np
import torch
from diffusers import AutoencoderKL

from loopdiff.embedded import prompts, world
from loopdiff.embedded.evaluator import HeldOutEvaluator
from loopdiff.embedded.pipeline import embedded_pipeline_path
from loopdiff.prompts import load_prompt_set
from loopdiff.rewards.base import build_reward


def textured_renders(texts: list[str], texture: str) -> torch.Tensor:
    """One scene per prompt with every object in ``texture``, as images in [-1, 1]."""
    rng = np.random.default_rng(0)
    scenes = []
    for text in texts:
        parsed = prompts.parse_prompt(text)
        parsed = replace(parsed, objects=tuple(replace(o, texture=texture) for o in parsed.objects))
        scenes.append(prompts.scene_for_prompt(parsed, rng))
    return torch.from_numpy(world.render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    folder = sys.argv[1] if len(sys.argv) > 1 else embedded_pipeline_path()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    strict, graded, vqa = HeldOutEvaluator(), HeldOutEvaluator(graded=True), build_reward("embedded_vqa")
    texts = list(load_prompt_set("embedded:color:val").prompts[:60])
    metadata = [{"category": "color"}] * len(texts)
    for texture in world.TEXTURES:
        images = textured_renders(texts, texture)
        decoded = ((vae.decode(vae.encode(images).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
        print(f"{texture:<10} clean strict {strict.score((images + 1) / 2, texts).mean():.3f}  "
              f"VAE round trip: strict {strict.score(decoded, texts).mean():.3f}  "
              f"graded {graded.score(decoded, texts).mean():.3f}  "
              f"VQA {torch.as_tensor(vqa(decoded, texts, metadata)).mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
