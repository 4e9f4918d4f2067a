"""The package's layers, read from every module's imports (at the top or inside a function): no module imports
itself through others (no import cycle), the core never imports the periphery, each core layer imports only from
its own layer and those below it, the command line sits above the Python API, and the study package below the
reports."""

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
    ("loopdiff.estimators", "loopdiff.generation"),
    ("loopdiff.config", "loopdiff.config_files"),
    ("loopdiff.models", "loopdiff.lora", "loopdiff.evaluation"),
    ("loopdiff.training",),
)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every loopdiff name ``path`` imports (``module.name`` for ``from module import name``), at the top or
    inside a function; a relative import is read as its absolute name."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "loopdiff"}


def _imported_modules(path: Path) -> set[str]:
    """The loopdiff modules ``path`` imports: each imported name's longest prefix that is a module."""
    def module_of(name: str) -> str:
        parts = name.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 1, -1)]
        return next((m for m in prefixes if m in MODULES), "loopdiff")

    return {module_of(name) for name in _imports(path)} - {_module_name(path)}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> the modules it imports) as ``[a, b, ..., a]``; [] if none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def _layer(module: str) -> int | None:
    return next((i for i, prefixes in enumerate(CORE_LAYERS) if _within(module, prefixes)), None)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}
CORE = [m for m in MODULES if not _within(m, PERIPHERY) and m not in ENTRY_POINTS]
# ``loopdiff.train`` writes the run's report as ``loopdiff train`` does: the one piece of the periphery the
# Python API composes.
API_PERIPHERY = ("loopdiff.reports.run",)


def test_no_import_cycle() -> None:
    """No loopdiff module imports itself through others, core and periphery alike (function-level imports
    included): the graph of who imports whom is acyclic."""
    graph = {module: _imported_modules(path) for module, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages() -> None:
    """Nor do the packages and top-level modules (``loopdiff.study``, ``loopdiff.reports``, ``loopdiff.cli``, ...)
    import each other in a circle: each sits above or below every other it is tied to."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph.setdefault(unit(module), set()).update(unit(i) for i in _imported_modules(path) if unit(i) != unit(module))
    cycle = _cycle(graph)
    assert cycle == [], "import cycle between packages: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_command_line_sits_above_the_python_api() -> None:
    """``loopdiff.cli`` imports ``loopdiff.api``; the API never imports the command line."""
    assert sorted(i for i in _imports(MODULES["loopdiff.api"]) if _within(i, ("loopdiff.cli",))) == []
    assert "loopdiff.api" in _imported_modules(MODULES["loopdiff.cli"])


def test_the_python_api_composes_only_the_run_report_of_the_periphery() -> None:
    imported = _imports(MODULES["loopdiff.api"])
    assert sorted(i for i in imported if _within(i, PERIPHERY) and not _within(i, API_PERIPHERY)) == []


@pytest.mark.parametrize("module", [m for m in MODULES if _within(m, ("loopdiff.study",))])
def test_the_study_package_sits_below_the_reports(module: str) -> None:
    """Studies run and collect results; writing their report (and the command that does both) is the
    reports' job, so nothing in ``loopdiff.study`` imports ``loopdiff.reports`` or the command line."""
    imported = _imports(MODULES[module])
    assert sorted(i for i in imported if _within(i, ("loopdiff.reports", "loopdiff.cli", "loopdiff.api"))) == []


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
    """The core names the embedded plugin only in its list of built-in plugins, loaded like an entry point; the
    plugin registers its models, prompts, rewards, packaged configs, the default model and config and the
    ``pretrain`` command."""
    from loopdiff.embedded.plugin import DEFAULT_CONFIG, configs_folder
    from loopdiff.plugins import (
        BUILTIN_PLUGINS, registered_commands, registered_config_folders, registered_default, registered_models,
        registered_prompt_sources,
    )
    from loopdiff.rewards import registered_rewards

    assert BUILTIN_PLUGINS == ("loopdiff.embedded.plugin:register",)
    assert "embedded" in registered_models() and "embedded" in registered_prompt_sources()
    assert "embedded_vqa" in registered_rewards()
    assert configs_folder() in registered_config_folders() and (configs_folder() / DEFAULT_CONFIG).is_file()
    assert registered_default() is not None and registered_default().model == "embedded"
    assert "pretrain" in registered_commands()


@pytest.mark.parametrize("module", [m for m in MODULES if not _within(m, ("loopdiff.embedded",))])
def test_only_the_plugin_names_the_embedded_model_and_its_files(module: str) -> None:
    """Outside ``loopdiff.embedded`` no code names the embedded model (``"embedded"``), one of its packaged
    configs (``embedded-*.yaml``) or imports its pretraining (help and error texts may mention it)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [s for s in strings if s == "embedded" or re.fullmatch(r"embedded[-\w]*\.ya?ml", s)] == []
    assert sorted(i for i in _imports(MODULES[module]) if _within(i, ("loopdiff.embedded",))) == []


def test_the_embedded_configs_ship_with_the_plugin() -> None:
    """The packaged ``embedded-*`` configs live in the plugin's folder, which the wheel's package data holds."""
    import tomllib

    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert "embedded/configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["loopdiff"]
    assert sorted(p.name for p in (SRC / "configs").glob("embedded*")) == []
    assert sorted(p.name for p in (SRC / "embedded" / "configs").glob("*.yaml")) != []
