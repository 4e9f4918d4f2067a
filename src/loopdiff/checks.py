"""What a setting allows beyond its type, declared with the setting: ``setting(..., check=at_least(1))``, or
with a command-line flag: ``add_argument("--steps", type=flag(int, at_least(1)))``.

A Check is a predicate and the allowed values in words; the code that reads the setting applies it and names
the setting, the bad value and the allowed values in one line (``OneLineParser`` for flags).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Check:
    """The values a field allows beyond its type: ``ok(value)`` and ``allowed``, those values in words (an error
    names the field, the value and ``allowed``); ``none``: what None means where the field is optional. ``ok`` may
    raise an error of its own, with a more precise message."""

    ok: Callable[[Any], bool]
    allowed: str
    none: str = ""

    def or_none(self, meaning: str) -> "Check":
        """The same check, telling what None (always allowed in an optional field) means."""
        return replace(self, none=meaning)

    def describe(self) -> str:
        """The allowed values in words, None's meaning included."""
        return f"{self.allowed}, or none {self.none}" if self.none else self.allowed


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float, what: str = "an integer") -> Check:
    """A number >= ``low`` (and finite)."""
    return Check(lambda v: _finite(v) and v >= low, f"{what} >= {low}")


def above(low: float) -> Check:
    """A finite number > ``low``."""
    return Check(lambda v: _finite(v) and v > low, f"a finite number > {low}")


def fraction(low_open: bool = False, high_open: bool = False) -> Check:
    """A number in [0, 1], each end excluded when asked."""
    def ok(v: Any) -> bool:
        return _finite(v) and (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)
    return Check(ok, f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def up_to_inf(low: float) -> Check:
    """A number > ``low``, infinity included (NaN is not)."""
    return Check(lambda v: isinstance(v, (int, float)) and v > low, f"a number > {low} (inf allowed)")


SEED = Check(lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")  # numpy takes no negative seed, torch none >= 2**64


def _device_here(name: str) -> bool:
    """Whether ``name`` is a torch device this machine has (cuda:N needs N + 1 CUDA devices)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cuda":
        return (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True


DEVICE_HERE = Check(_device_here, "cpu, or a torch device this machine has (cuda:N needs N + 1 CUDA devices)")
FOLDER = Check(lambda v: v.strip() != "" and not Path(v).is_file(), "a folder path (not empty, not a file)")


def ranged(default: Any = MISSING, check: Check | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that declares the values it allows (``failed_field`` finds one that breaks them)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def failed_field(instance: Any) -> tuple[str, Any, Check] | None:
    """``(name, value, check)`` of the first field of the dataclass ``instance`` whose value fails the check
    it declares (``metadata["check"]``; None passes); None when every field passes."""
    for declared in fields(instance):
        check: Check | None = declared.metadata.get("check")
        value = getattr(instance, declared.name)
        if check is not None and value is not None and not check.ok(value):
            return declared.name, value, check
    return None


def flag(convert: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """An argparse ``type=``: the flag's text read by ``convert`` (int, float, str, Path) and checked by ``check``;
    a bad value is a usage error naming it and what is allowed."""
    name = getattr(convert, "__name__", "value")

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}") from None
        if not check.ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: {check.allowed}")
        return value

    parse.__name__ = name
    return parse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``<prog>: error: <message>``, with exit code 2
    (``--help`` still shows the usage); its subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")
