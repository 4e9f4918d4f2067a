"""A table of the registered rewards: what each needs and whether it can run here now."""

from __future__ import annotations

import textwrap
from typing import Any, Mapping

from loopdiff.rewards.base import registered_rewards


def reward_rows(options: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, str, str, str]]:
    """``(name, description, needs, status)`` per registered reward; status is ``ready`` or why not."""
    options = options or {}
    rows = []
    for name, info in registered_rewards().items():
        reason = info.unavailable_reason(options.get(name, {}))
        needs = info.needs or "-"
        if info.extras:
            needs += f" [python: {', '.join(info.extras)}]"
        rows.append((name, info.description, needs, "ready" if reason is None else f"unavailable: {reason}"))
    return rows


def format_reward_table(options: Mapping[str, Mapping[str, Any]] | None = None, width: int = 100) -> str:
    """Plain-text listing of every registered reward (``options[name]`` as the reward would get them)."""
    lines = []
    for name, description, needs, status in reward_rows(options):
        lines.append(name)
        for label, text in (("what", description), ("needs", needs), ("status", status)):
            wrapped = textwrap.wrap(text, width=width - 12) or ["-"]
            lines.append(f"    {label:<7} {wrapped[0]}")
            lines.extend(f"            {more}" for more in wrapped[1:])
    return "\n".join(lines)
