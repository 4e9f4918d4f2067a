"""The reward interface and the registry of rewards by name.

A reward is any callable ``(images, prompts, metadata) -> scores``:

- ``images``: float tensor ``(N, 3, H, W)`` with values in ``[0, 1]`` (decoded samples),
- ``prompts``: the ``N`` prompt strings,
- ``metadata``: ``N`` dicts (prompt-file metadata such as the T2I-CompBench category),
- returns a float32 tensor ``(N,)`` on the CPU.

Rewards are registered under a name with a factory that builds the callable from keyword options
(paths to weights, devices, ...), or named ``package.module:function`` from the user's own code
(docs/custom-rewards.md). ``build_reward("a:1.0,b:0.1", options)`` builds a weighted sum. The registry holds
the built-in rewards and those of plugins (``loopdiff.plugins``), such as the embedded world's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from loopdiff.plugins import load_plugins


class RewardFn(Protocol):
    """What the trainer calls: scores for a batch of decoded images and their prompts."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor: ...


class RewardError(ValueError):
    """A reward cannot be built or run (unknown name, missing weights, bad options)."""


@dataclass(frozen=True)
class PromptRequirement:
    """The prompts a reward can score: ``parse(prompt)`` raises ValueError for any other."""

    parse: Callable[[str], object]
    kind: str  # what they are, in messages: "embedded-world prompts"
    hint: str  # where to get them: "embedded:<category> prompts"


@dataclass(frozen=True)
class RewardInfo:
    """A registry entry: how to build a reward and what it needs."""

    name: str
    factory: Callable[..., RewardFn]
    description: str
    needs: str = ""
    extras: tuple[str, ...] = ()  # python modules that must be importable
    check: Callable[[Mapping[str, Any]], str | None] | None = None  # returns why it cannot run, or None
    prompts: PromptRequirement | None = None  # None: any prompt

    def unavailable_reason(self, options: Mapping[str, Any] | None = None) -> str | None:
        """Why this reward cannot run here now (missing extra or weights), or ``None`` if it can."""
        for module in self.extras:
            if importlib.util.find_spec(module) is None:
                return f"python package '{module}' is not installed"
        if self.check is not None:
            return self.check(options or {})
        return None


_REGISTRY: dict[str, RewardInfo] = {}


def register_reward(
    name: str,
    *,
    description: str,
    needs: str = "",
    extras: Sequence[str] = (),
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
    prompts: PromptRequirement | None = None,
) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering a reward factory under ``name``."""

    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _REGISTRY[name] = RewardInfo(name, factory, description, needs, tuple(extras), check, prompts)
        return factory

    return decorator


def registered_rewards() -> dict[str, RewardInfo]:
    """All registered rewards, by name (loads the plugins and imports the reward modules first)."""
    _load_reward_modules()
    return dict(sorted(_REGISTRY.items()))


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """Parse ``"name"`` or ``"a:1.0,b:0.1"`` into ``[(name, weight), ...]``.

    A name may be ``package.module:function``; a term's last ``:`` part is its weight only if it is a number,
    so ``"mymod:fn"`` is one name of weight 1 and ``"mymod:fn:0.5"`` that name of weight 0.5.
    """
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise RewardError(f"reward spec {spec!r} has an empty term; expected 'name' or 'name:weight,...'")
        name, sep, weight_text = part.rpartition(":")
        weight = _as_float(weight_text) if sep else None
        terms.append((name.strip(), weight) if weight is not None else (part, 1.0))
    return terms


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class WeightedSum:
    """``sum_i w_i * reward_i(images, prompts, metadata)``; keeps the last per-term scores in ``last_terms``."""

    def __init__(self, terms: Sequence[tuple[str, float, RewardFn]]):
        self.terms = list(terms)
        self.last_terms: dict[str, torch.Tensor] = {}

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for name, weight, fn in self.terms:
            scores = as_scores(fn(images, prompts, metadata), len(prompts), name)
            self.last_terms[name] = scores
            total += weight * scores
        return total


class RewardFailed(RewardError):
    """A reward raised while scoring a batch; the message names the reward and its error."""


def score_batch(reward_fn: RewardFn, images: torch.Tensor, prompts: Sequence[str],
                metadata: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
    """``reward_fn``'s scores as :func:`as_scores` checks them; an exception inside the reward becomes a
    :class:`RewardFailed` naming the reward (the original stays chained as its cause)."""
    try:
        raw = reward_fn(images, prompts, metadata)
    except RewardError:
        raise
    except Exception as error:
        raise RewardFailed(f"reward {name!r} raised {type(error).__name__}: {error}") from error
    return as_scores(raw, len(prompts), name)


def as_scores(value: Any, n: int, name: str) -> torch.Tensor:
    """Convert a reward's output to a float32 CPU tensor of shape ``(n,)``, or raise naming the reward.

    ``(n,)`` and ``(n, 1)`` are accepted (numbers, arrays or tensors); any other shape is a RewardError.
    """
    try:
        scores = torch.as_tensor(value).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise RewardError(f"reward '{name}' returned a {type(value).__name__}; expected a tensor of {n} scores") from None
    if scores.numel() != n or scores.dim() > 2 or (scores.dim() == 2 and scores.shape[1] != 1):
        raise RewardError(
            f"reward '{name}' returned {scores.numel()} scores for {n} images (shape {tuple(scores.shape)}); "
            f"expected shape ({n},)"
        )
    return scores.reshape(-1)


def build_reward(spec: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> RewardFn:
    """Build the reward named by ``spec`` (a name, or a weighted sum ``"a:1.0,b:0.1"``).

    A name is a registered reward or ``package.module:function`` (see :func:`import_reward`);
    ``options[name]`` holds keyword arguments for that reward's factory.
    """
    options = options or {}
    registry = registered_rewards()
    terms = parse_reward_spec(spec)
    built: list[tuple[str, float, RewardFn]] = []
    for name, weight in terms:
        if ":" in name:
            built.append((name, weight, import_reward(name, options, registry)))
            continue
        info = registry.get(name)
        if info is None:
            raise RewardError(
                f"unknown reward '{name}'; registered rewards: {', '.join(registry)} (or package.module:function)"
            )
        reason = info.unavailable_reason(options.get(name, {}))
        if reason is not None:
            raise RewardError(f"reward '{name}' cannot run here: {reason}")
        built.append((name, weight, info.factory(**_checked_options(name, info.factory, options.get(name, {})))))
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]
    return WeightedSum(built)


def _checked_options(name: str, factory: Callable[..., RewardFn], options: Any) -> dict[str, Any]:
    """``options`` as keyword arguments of ``factory``, or a RewardError naming an unknown one."""
    if not isinstance(options, Mapping):
        raise RewardError(f"reward.options.{name}={options!r} is invalid; allowed: a mapping of option names to values")
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    unknown = [key for key in options if key not in parameters]
    if unknown:
        allowed = ", ".join(parameters) or "none"
        raise RewardError(f"reward '{name}' has no option '{unknown[0]}'; its options: {allowed}")
    return dict(options)


def import_reward(
    name: str, options: Mapping[str, Mapping[str, Any]], registry: Mapping[str, RewardInfo] | None = None
) -> RewardFn:
    """The reward ``package.module:attribute`` from the user's code, its scores checked to be ``(N,)``.

    The attribute is the reward callable itself, or a factory called with ``options[name]`` as keyword
    arguments when ``options`` has an entry for ``name`` or the attribute is a class.
    """
    target = import_reward_target(name, registry)
    if name in options or inspect.isclass(target):
        target = target(**_checked_options(name, target, options.get(name, {})))
    if not callable(target):
        raise RewardError(f"reward '{name}' is a {type(target).__name__}, not a callable (images, prompts, metadata)")
    return CheckedReward(target, name)


def import_reward_target(name: str, registry: Mapping[str, RewardInfo] | None = None) -> Any:
    """The attribute ``package.module:attribute`` names, imported but not called (a RewardError names what
    cannot be imported)."""
    module_name, _, attribute = name.partition(":")
    if registry is not None and module_name in registry:
        raise RewardError(f"reward spec {name!r}: weight {attribute!r} of '{module_name}' is not a number")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # an import can fail with anything the module raises
        raise RewardError(f"reward '{name}': cannot import module '{module_name}': {type(error).__name__}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward '{name}': module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    return target


class CheckedReward:
    """A reward from the user's code whose output is checked: a RewardError names it unless it is ``(N,)``."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn, self.name = fn, name

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return as_scores(self.fn(images, prompts, metadata), len(prompts), self.name)


# Modules whose import registers rewards: the built-in ones, then those plugins add.
_REWARD_MODULES = [
    "loopdiff.rewards.jpeg",
    "loopdiff.rewards.control",
    "loopdiff.rewards.blip_vqa",
    "loopdiff.rewards.detection",
    "loopdiff.rewards.geneval",
    "loopdiff.rewards.aesthetic",
    "loopdiff.rewards.clipscore",
    "loopdiff.rewards.preference",
    "loopdiff.rewards.imagereward",
    "loopdiff.rewards.alignment",
    "loopdiff.rewards.ocr",
    "loopdiff.rewards.server",
    "loopdiff.rewards.compbench_by_category",
]
_IMPORTED: set[str] = set()


def register_reward_modules(*modules: str) -> None:
    """Modules to import when the rewards are first listed (a plugin's rewards register on import)."""
    _REWARD_MODULES.extend(m for m in modules if m not in _REWARD_MODULES)


def _load_reward_modules() -> None:
    """Load the plugins, then import the reward modules not imported yet (those present in this install)."""
    load_plugins()
    for module in [m for m in _REWARD_MODULES if m not in _IMPORTED]:
        _IMPORTED.add(module)
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
