"""How well each training reward agrees with the held-out evaluator, per image, on a model's samples.

Samples 8 images for each of the first 48 training prompts of a category and prints the Pearson
correlation of every training reward with the evaluator's strict and graded scores, over all images and
within each prompt's group (the part a leave-one-out advantage uses).

    python reward_agreement.py [pipeline folder or "embedded"] [category]
"""

import sys

import numpy as np
import torch

from loopdiff.config import ModelConfig
from loopdiff.prompts import load_prompt_set
from loopdiff.rewards.base import build_reward
from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
from loopdiff.sampling.trajectories import PromptEncoder, decode_latents, sample_trajectories
from loopdiff.models import configure_attention, load_pipeline

TRAINING_REWARDS = ("embedded_vqa", "embedded_alignment", "embedded_compbench")
PROMPTS, IMAGES, PROMPTS_PER_CALL = 48, 8, 4


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def within_groups(scores: np.ndarray) -> np.ndarray:
    """Scores minus their prompt's mean: (prompts, images) -> same shape."""
    return scores - scores.mean(axis=1, keepdims=True)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(2)
    folder = sys.argv[1] if len(sys.argv) > 1 else "embedded"
    category = sys.argv[2] if len(sys.argv) > 2 else "color"
    pipe = load_pipeline(ModelConfig(pretrained=folder))
    configure_attention(pipe.unet, "auto", torch.device("cpu"))
    policy = DiffusionPolicy(pipe.unet, pipe.scheduler, PolicyConfig(num_steps=20))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu")
    rewards = {name: build_reward(name) for name in TRAINING_REWARDS}
    rewards["strict"] = build_reward("embedded_eval")
    rewards["graded"] = build_reward("embedded_eval", {"embedded_eval": {"graded": True}})
    prompt_set = load_prompt_set(f"embedded:{category}").head(PROMPTS)
    generator = torch.Generator().manual_seed(7)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    for start in range(0, len(prompt_set), PROMPTS_PER_CALL):
        chunk = slice(start, start + PROMPTS_PER_CALL)
        texts = [p for p in prompt_set.prompts[chunk] for _ in range(IMAGES)]
        metadata = [m for m in prompt_set.metadata[chunk] for _ in range(IMAGES)]
        latents, _ = sample_trajectories(policy, encoder(texts), encoder.unconditional(), generator, batch_size=32)
        images = decode_latents(pipe.vae, latents[:, -1])
        for name, reward in rewards.items():
            scores[name].append(torch.as_tensor(reward(images, texts, metadata)).float().view(-1, IMAGES))
    s = {name: torch.cat(values).numpy() for name, values in scores.items()}
    print(f"held-out means: strict {s['strict'].mean():.3f}, graded {s['graded'].mean():.3f}")
    for name in TRAINING_REWARDS:
        print(f"{name:<20} mean {s[name].mean():.3f}  "
              f"corr strict {correlation(s[name], s['strict']):.3f} graded {correlation(s[name], s['graded']):.3f}  "
              f"within groups: strict {correlation(within_groups(s[name]), within_groups(s['strict'])):.3f} "
              f"graded {correlation(within_groups(s[name]), within_groups(s['graded'])):.3f}")


if __name__ == "__main__":
    main()
