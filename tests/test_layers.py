"""The package's layers, read from every module's imports: the core never imports the periphery, and each
core layer imports only from its own layer and those below it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import loopdiff

SRC = Path(loopdiff.__file__).parent
PERIPHERY = ("loopdiff.embedded", "loopdiff.diagnostics", "loopdiff.study", "loopdiff.reports")
ENTRY_POINTS = ("loopdiff", "loopdiff.api", "loopdiff.cli")  # compose everything, periphery included
# Core layers, lowest first; a module belongs to the first layer with a prefix of its name.
CORE_LAYERS = (
    ("loopdiff.plugins", "loopdiff.checks", "loopdiff.transfer"),
    ("loopdiff.prompts", "loopdiff.rewards", "loopdiff.sampling", "loopdiff.grids", "loopdiff.advantages",
     "loopdiff.objectives", "loopdiff.minibatches", "loopdiff.sharding"),
    ("loopdiff.estimators",),
    ("loopdiff.config",),
    ("loopdiff.models", "loopdiff.lora", "loopdiff.evaluation"),
    ("loopdiff.training",),
)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every loopdiff module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "loopdiff"}


def _layer(module: str) -> int | None:
    return next((i for i, prefixes in enumerate(CORE_LAYERS) if _within(module, prefixes)), None)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}
CORE = [m for m in MODULES if not _within(m, PERIPHERY) and m not in ENTRY_POINTS]


def test_every_core_module_has_a_layer() -> None:
    assert [m for m in CORE if _layer(m) is None] == []


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_periphery_and_only_downward(module: str) -> None:
    imported = _imports(MODULES[module])
    assert sorted(i for i in imported if _within(i, PERIPHERY)) == []
    assert sorted(i for i in imported if _within(i, ENTRY_POINTS[1:])) == []
    own = _layer(module)
    assert sorted(i for i in imported if (_layer(i) or 0) > own) == [], f"{module} is in layer {own}"


@pytest.mark.parametrize("module", [m for m in CORE if m != "loopdiff.plugins"])
def test_core_names_no_periphery_module_to_import(module: str) -> None:
    """No ``importlib.import_module("loopdiff.embedded...")`` either: only the plugin list names one."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [s for s in strings if re.fullmatch(r"loopdiff\.(embedded|diagnostics|study|reports)[\w.:]*", s)] == []


def test_config_imports_no_training_module() -> None:
    assert sorted(i for i in _imports(MODULES["loopdiff.config"]) if _within(i, ("loopdiff.training",))) == []


def test_the_embedded_world_is_a_plugin() -> None:
    """The core names the embedded plugin only in its list of built-in plugins, loaded like an entry point."""
    from loopdiff.plugins import BUILTIN_PLUGINS, registered_models, registered_prompt_sources
    from loopdiff.rewards import registered_rewards

    assert BUILTIN_PLUGINS == ("loopdiff.embedded.plugin:register",)
    assert "embedded" in registered_models() and "embedded" in registered_prompt_sources()
    assert "embedded_vqa" in registered_rewards()
