"""Plugins: models, prompt sources, configs, commands and the defaults by name, registered from outside the core.

A plugin is a function that registers what it adds, with :func:`register_model`, :func:`register_prompt_source`,
``loopdiff.rewards.register_reward``, :func:`register_configs` (a folder of packaged configs, found by name),
:func:`register_default` (the model and config a run without either uses) and :func:`register_command` (a
``loopdiff`` subcommand that parses its own options). The core loads the built-in plugins
(``BUILTIN_PLUGINS``) and every entry point of the group ``loopdiff.plugins``, which is how a third party adds
its own::

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


@dataclass(frozen=True)
class Command:
    """A ``loopdiff <name>`` subcommand: ``run(argv) -> exit code`` parses its own options (``--help`` too)."""

    name: str
    run: Callable[[list[str]], int]
    help: str
    description: str = ""


@dataclass(frozen=True)
class Default:
    """What a run names neither a model nor a config for uses: ``model`` and the packaged ``config``."""

    model: str
    config: str


_MODELS: dict[str, ModelEntry] = {}
_PROMPT_SOURCES: dict[str, PromptSource] = {}
_CONFIG_FOLDERS: list[Callable[[], Path]] = []
_COMMANDS: dict[str, Command] = {}
_DEFAULT: list[Default] = []  # the first registered wins
_LOADED: list[str] = []  # the plugins registered so far, in order


def register_model(name: str, folder: Callable[[], Path], defaults: Mapping[str, str] | None = None) -> None:
    """``model.pretrained=<name>`` loads the pipeline folder ``folder()``; ``defaults`` fill unset config fields."""
    _MODELS[name] = ModelEntry(name, folder, dict(defaults or {}))


def register_prompt_source(scheme: str, resolve: Callable[[str, str], Any], usage: str) -> None:
    """Prompt specs ``<scheme>:<argument>`` are read by ``resolve(argument, spec) -> PromptSet``."""
    _PROMPT_SOURCES[scheme] = PromptSource(scheme, resolve, usage)


def register_configs(folder: Callable[[], Path]) -> None:
    """The ``*.yaml`` files in ``folder()`` are packaged configs, found by name (``--config <name>``)."""
    _CONFIG_FOLDERS.append(folder)


def register_default(model: str, config: str) -> None:
    """``model`` is ``model.pretrained``'s default, and the packaged ``config`` is what a run on it starts
    from when no config is given; the first plugin to register a default keeps it."""
    if not _DEFAULT:
        _DEFAULT.append(Default(model, config))


def register_command(name: str, run: Callable[[list[str]], int], help: str, description: str = "") -> None:
    """``loopdiff <name> ARGS...`` calls ``run(ARGS)`` and exits with what it returns."""
    _COMMANDS[name] = Command(name, run, help, description)


def registered_models() -> dict[str, ModelEntry]:
    load_plugins()
    return dict(_MODELS)


def registered_prompt_sources() -> dict[str, PromptSource]:
    load_plugins()
    return dict(_PROMPT_SOURCES)


def registered_config_folders() -> list[Path]:
    load_plugins()
    return [folder() for folder in _CONFIG_FOLDERS]


def registered_default() -> Default | None:
    """The registered default model and config; None when no plugin registers one."""
    load_plugins()
    return _DEFAULT[0] if _DEFAULT else None


def registered_commands() -> dict[str, Command]:
    load_plugins()
    return dict(_COMMANDS)


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
