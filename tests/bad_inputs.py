"""Running an entry point on a bad input and reading its error: the helpers the tests/test_bad_inputs_*.py tables
share. A row is (argv, the exit code, texts the one error line must hold)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import pytest

NOISE = re.compile(r"^\[transformers\]|real_accelerator|\d+%\||it/s\]")  # library warnings and progress bars


def run(entry: Callable[[list[str]], int | None], argv: Sequence[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """``entry(argv)``'s exit code (a SystemExit's too) and its stderr lines, library noise left out."""
    try:
        code = entry(list(argv))
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, [line for line in err.strip().splitlines() if line.strip() and not NOISE.search(line)]


def assert_one_error_line(code: int, lines: list[str], expected_code: int, prefix: str, texts: Sequence[str]) -> None:
    """One stderr line, ``<prefix>: error: ...``, holding every one of ``texts``; exit code ``expected_code``."""
    assert code == expected_code, lines
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), lines
    for text in texts:
        assert text in lines[0], (text, lines[0])
