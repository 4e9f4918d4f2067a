"""One reward per prompt category: ``metadata["category"]`` picks the scorer (T2I-CompBench's protocol).

``t2i_compbench`` scores color/shape/texture prompts with ``blip_vqa``, spatial prompts with ``spatial`` and
numeracy prompts with ``numeracy``, so a run can mix categories. Scorers are built on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from loopdiff.rewards.base import RewardError, RewardFn, as_scores, build_reward, register_reward

COMPBENCH_REWARDS = {
    "color": "blip_vqa",
    "shape": "blip_vqa",
    "texture": "blip_vqa",
    "spatial": "spatial",
    "numeracy": "numeracy",
}


class CategoryDispatch:
    """Scores each image with the reward of its prompt's category (built lazily, once per reward)."""

    def __init__(self, reward_for_category: Mapping[str, str], build: Callable[[str], RewardFn], name: str):
        self.reward_for_category = dict(reward_for_category)
        self.build = build
        self.name = name
        self._built: dict[str, RewardFn] = {}

    def _reward(self, category: str) -> RewardFn:
        reward_name = self.reward_for_category.get(category)
        if reward_name is None:
            raise RewardError(
                f"reward '{self.name}' has no scorer for category {category!r}; "
                f"categories: {', '.join(self.reward_for_category)}"
            )
        if reward_name not in self._built:
            self._built[reward_name] = self.build(reward_name)
        return self._built[reward_name]

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        categories = [str(m.get("category", "")) for m in metadata]
        scores = torch.zeros(len(prompts), dtype=torch.float32)
        for category in dict.fromkeys(categories):
            index = [i for i, c in enumerate(categories) if c == category]
            chosen = self._reward(category)
            values = chosen(images[index], [prompts[i] for i in index], [metadata[i] for i in index])
            scores[index] = as_scores(values, len(index), f"{self.name}/{category}")
        return scores


@register_reward(
    "t2i_compbench",
    description="T2I-CompBench by prompt category: blip_vqa (color/shape/texture), spatial, numeracy",
    needs="the weights of blip_vqa, spatial and numeracy (options per reward name)",
)
def t2i_compbench(**options: Mapping[str, Any]) -> CategoryDispatch:
    """``options`` maps a sub-reward name (blip_vqa, spatial, numeracy) to its own options."""
    return CategoryDispatch(COMPBENCH_REWARDS, lambda name: build_reward(name, options), "t2i_compbench")
