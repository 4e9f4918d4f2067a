"""Bad inputs to ``loopdiff sample``: one line naming the input, exit code 2, before the model loads (but for the
rows that need the model's shape). A new flag gets its rows by adding lines to ROWS."""

from __future__ import annotations

import pytest

from bad_inputs import assert_one_error_line, run
from loopdiff.cli import main

# (flags added to a valid tiny sampling call, texts the error line holds, whether the model may load first)
ROWS = {
    "negative steps": (["--steps", "-1"], ["--steps", "'-1'", ">= 1"], False),
    "steps in scientific notation": (["--steps", "1e3"], ["--steps", "'1e3'", "not a valid int"], False),
    "no images per prompt": (["--num", "0"], ["--num", "'0'", ">= 1"], False),
    "images per prompt not a number": (["--num", "four"], ["--num", "'four'", "not a valid int"], False),
    "out is a folder": (lambda tmp: ["--out", str(tmp)], ["--out", "not a folder"], False),
    "out without an image suffix": (["--out", "grid"], ["--out", "'grid'", ".png"], False),
    "out with a text suffix": (["--out", "grid.txt"], ["--out", "'grid.txt'", ".png"], False),
    "guidance below 1": (["--guidance-scale", "0.5"], ["--guidance-scale", "'0.5'", ">= 1"], False),
    "guidance infinite": (["--guidance-scale", "inf"], ["--guidance-scale", "'inf'"], False),
    "eta NaN": (["--eta", "nan"], ["--eta", "'nan'", ">= 0"], False),
    "negative seed": (["--seed", "-1"], ["--seed", "'-1'", "[0, 2**63)"], False),
    "zero resolution": (["--resolution", "0"], ["--resolution", "'0'", "[1, 8192]"], False),
    "unknown SDE form": (["--sde-type", "ode"], ["--sde-type", "'ode'", "'sde', 'cps'"], False),
    "seed beyond 64 bits": (["--seed", "99999999999999999999"], ["--seed", "[0, 2**63)"], False),
    "T5 length zero": (["--max-sequence-length", "0"], ["--max-sequence-length", "'0'", "[1, 512]"], False),
    "resolution that would not fit in memory": (["--resolution", "100000"], ["--resolution", "[1, 8192]"], False),
    "resolution the UNet cannot take": (["--resolution", "44"], ["sampling.resolution=44", "multiple of 8"], True),
    "device this machine lacks": (["--device", "mps"], ["--device", "'mps'"], False),
    "lora folder that does not exist": (["--lora", "/nonexistent/lora"], ["--lora", "final_lora/"], False),
    "model folder that does not exist": (["--model", "/nonexistent/pipeline"], ["model_index.json"], True),
    "empty model name": (["--model", ""], ["model.pretrained=''"], True),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_sample_input_is_one_line_and_exit_code_2(row, tiny_pipeline_dir, tmp_path, capsys, monkeypatch) -> None:
    flags, texts, may_load = ROWS[row]
    flags = flags(tmp_path) if callable(flags) else flags
    monkeypatch.chdir(tmp_path)
    loads = []
    if not may_load:
        monkeypatch.setattr("loopdiff.cli._load_for_inference", lambda *args: loads.append(args) or 1 / 0)
    valid = ["--model", str(tiny_pipeline_dir), "--prompt", "a red circle", "--steps", "2", "--num", "1"]
    code, lines = run(main, ["sample", *valid, *flags], capsys)
    assert_one_error_line(code, lines, 2, "loopdiff sample", texts)
    assert not loads, "the model must not load before the input is checked"
    assert not (tmp_path / "samples.png").exists()


def test_missing_prompt_is_one_line(capsys) -> None:
    code, lines = run(main, ["sample", "--steps", "2"], capsys)
    assert_one_error_line(code, lines, 2, "loopdiff sample", ["--prompt"])
