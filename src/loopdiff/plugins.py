"""Plugins: models and prompt sources by name, registered from outside the core.

A plugin is a function that registers what it adds, with :func:`register_model`, :func:`register_prompt_source`
and ``loopdiff.rewards.register_reward``. The core loads the built-in plugins (``BUILTIN_PLUGINS``) and every
entry point of the group ``loopdiff.plugins``, which is how a third party adds its own::

    [project.entry-points."loopdiff.plugins"]
    mine = "mypackage.loopdiff_plugin:register"

The embedded world (``loopdiff.embedded``) is the first plugin; nothing in the core imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

GROUP = "loopdiff.plugins"
BUILTIN_PLUGINS = ("loopdiff.embedded.plugin:register",)


@dataclass(frozen=True)
class ModelEntry:
    """A model by name: where its pipeline folder is, and the config values a run on it defaults to."""

    name: str
    folder: Callable[[], Path]
    defaults: Mapping[str, str] = field(default_factory=dict)  # "section.field" -> value, for unset fields


@dataclass(frozen=True)
class PromptSource:
    """A prompt source ``<scheme>:<argument>``: ``resolve(argument, spec)`` returns its PromptSet."""

    scheme: str
    resolve: Callable[[str, str], Any]
    usage: str  # how to write it, for error messages: "embedded:<category>[:val]"


_MODELS: dict[str, ModelEntry] = {}
_PROMPT_SOURCES: dict[str, PromptSource] = {}
_LOADED: list[str] = []  # the plugins registered so far, in order


def register_model(name: str, folder: Callable[[], Path], defaults: Mapping[str, str] | None = None) -> None:
    """``model.pretrained=<name>`` loads the pipeline folder ``folder()``; ``defaults`` fill unset config fields."""
    _MODELS[name] = ModelEntry(name, folder, dict(defaults or {}))


def register_prompt_source(scheme: str, resolve: Callable[[str, str], Any], usage: str) -> None:
    """Prompt specs ``<scheme>:<argument>`` are read by ``resolve(argument, spec) -> PromptSet``."""
    _PROMPT_SOURCES[scheme] = PromptSource(scheme, resolve, usage)


def registered_models() -> dict[str, ModelEntry]:
    load_plugins()
    return dict(_MODELS)


def registered_prompt_sources() -> dict[str, PromptSource]:
    load_plugins()
    return dict(_PROMPT_SOURCES)


def load_plugins() -> None:
    """Call every plugin's register function once: the built-in ones, then the installed entry points."""
    if _LOADED:
        return
    targets = dict.fromkeys([*BUILTIN_PLUGINS, *(ep.value for ep in entry_points(group=GROUP))])
    _LOADED.extend(targets)
    for target in targets:
        _resolve(target)()


def _resolve(target: str) -> Callable[[], None]:
    """``"package.module:function"`` -> the function."""
    module_name, _, attribute = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value
