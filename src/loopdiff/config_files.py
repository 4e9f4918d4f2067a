"""Config files by name: the packaged configs (the core's folder and each folder a plugin registers) and the
file a run starts from, which for an unset model or the registered default model is the plugin's default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Mapping

from loopdiff.plugins import registered_config_folders, registered_default


def config_folders() -> list[Path]:
    """The folders packaged configs are found in: ``loopdiff/configs``, then those the plugins register."""
    return [Path(str(resources.files("loopdiff") / "configs")), *registered_config_folders()]


def packaged_config(name: str) -> Path:
    """The packaged config file ``name`` (suffix included) from the first folder holding it; a path that does
    not exist, in the core's folder, when none does."""
    folders = config_folders()
    return next((folder / name for folder in folders if (folder / name).is_file()), folders[0] / name)


def packaged_config_names() -> list[str]:
    """Names of the packaged training configs (without ``.yaml``; study specs left out)."""
    return sorted({path.name.removesuffix(".yaml") for folder in config_folders() for path in folder.glob("*.yaml")
                   if not path.name.startswith("study-")})


def resolve_config(name_or_path: str) -> Path:
    """A config file path as given, else the packaged config of that name (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = packaged_config(name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    return packaged if packaged.is_file() else path


def start_config(config: str | None, model: object = None) -> Path | None:
    """The config file a run starts from: ``config`` (a file or packaged name) if given; else the registered
    default config when ``model`` is unset or the registered default model, and none for any other model,
    which then starts from the dataclass defaults and never inherits the default model's prompts or rewards."""
    if config:
        return resolve_config(config)
    default = registered_default()
    return resolve_config(default.config) if default is not None and model in (None, default.model) else None


def requested_model(values: object) -> object:
    """``model.pretrained`` in a nested mapping of config values, or None when it is not set there."""
    model = values.get("model") if isinstance(values, Mapping) else None
    return model.get("pretrained") if isinstance(model, Mapping) else None
