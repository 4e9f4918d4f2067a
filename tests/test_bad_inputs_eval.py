"""Bad inputs to ``loopdiff eval``: one line naming the input, exit code 2, and (all but the rows that need the
model's shape) before the model loads. A new flag gets its rows by adding lines to ROWS."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import assert_one_error_line, run
from loopdiff.cli import main

# (flags added to a valid tiny evaluation, texts the error line holds, whether the model may load first)
ROWS = {
    "images per prompt negative": (["--images-per-prompt", "-2"], ["--images-per-prompt", "'-2'", ">= 1"], False),
    "images per prompt zero": (["--images-per-prompt", "0"], ["--images-per-prompt", "'0'", ">= 1"], False),
    "no prompts": (["--max-prompts", "0"], ["--max-prompts", "'0'", ">= 1"], False),
    "no steps": (["--steps", "0"], ["--steps", "'0'", ">= 1"], False),
    "steps not an integer": (["--steps", "1.5"], ["--steps", "'1.5'", "not a valid int"], False),
    "guidance below 1": (["--guidance-scale", "0.5"], ["--guidance-scale", "'0.5'", ">= 1"], False),
    "guidance NaN": (["--guidance-scale", "nan"], ["--guidance-scale", "'nan'"], False),
    "negative eta": (["--eta", "-1"], ["--eta", "'-1'", ">= 0"], False),
    "no images per call": (["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"], False),
    "negative seed": (["--seed", "-1"], ["--seed", "'-1'", "[0, 2**63)"], False),
    "seed beyond 64 bits": (["--seed", str(2**64)], ["--seed", str(2**64)], False),
    "zero resolution": (["--resolution", "0"], ["--resolution", "'0'", "[1, 8192]"], False),
    "resolution that would not fit in memory": (["--resolution", "100000"], ["--resolution", "'100000'"], False),
    "resolution the UNet cannot take": (["--resolution", "44"], ["sampling.resolution=44", "multiple of 8"], True),
    "T5 length out of range": (["--max-sequence-length", "999"], ["--max-sequence-length", "[1, 512]"], False),
    "unknown SDE form": (["--sde-type", "foo"], ["--sde-type", "'foo'"], False),
    "device that is no device": (["--device", "banana"], ["--device", "'banana'"], False),
    "CUDA device this machine lacks": (["--device", "cuda:7"], ["--device", "'cuda:7'", "cuda:N"], False),
    "out is a folder": (lambda tmp: ["--out", str(tmp)], ["--out", "not a folder"], False),
    "lora folder that does not exist": (["--lora", "/nonexistent/lora"], ["--lora", "pytorch_lora_weights"], False),
    "lora folder without weights": (lambda tmp: ["--lora", str(tmp)], ["--lora", "final_lora/"], False),
    "prompt file that does not exist": (["--prompts", "missing.txt"], ["'missing.txt'", "does not exist"], False),
    "prompt file that is a folder": (lambda tmp: ["--prompts", str(tmp)], ["is a directory"], False),
    "prompt file without prompts": (lambda tmp: ["--prompts", str(_write(tmp / "blank.txt", "\n\n"))],
                                    ["blank.txt", "holds no prompts"], False),
    "unknown reward": (["--reward", "nosuch"], ["unknown reward 'nosuch'"], False),
    "empty reward": (["--reward", ""], ["reward spec ''", "empty term"], False),
    "reward options not JSON": (["--reward-options", "{jpeg: 1}"], ["--reward-options '{jpeg: 1}' is not JSON"], False),
    "reward options a list": (["--reward-options", "[1]"], ["--reward-options '[1]'", "object of options"], False),
    "reward options for a reward not named": (
        ["--reward-options", '{"jpeg_compresibility": {"quality": 80}}'],
        ["'jpeg_compresibility'", "--reward 'jpeg_incompressibility' does not name"], False),
    "misspelt reward option": (["--reward-options", '{"jpeg_incompressibility": {"qualty": 80}}'],
                               ["'qualty'", "quality"], False),
    "model folder that does not exist": (["--model", "/nonexistent/pipeline"],
                                         ["model.pretrained='/nonexistent/pipeline'", "model_index.json"], True),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_eval_input_is_one_line_and_exit_code_2(row, tiny_pipeline_dir, tmp_path, capsys, monkeypatch) -> None:
    flags, texts, may_load = ROWS[row]
    flags = flags(tmp_path) if callable(flags) else flags
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val.txt").write_text("a red circle\na blue square\n")
    loads = []
    if not may_load:
        monkeypatch.setattr("loopdiff.cli._load_for_inference", lambda *args: loads.append(args) or 1 / 0)
    valid = ["--model", str(tiny_pipeline_dir), "--prompts", "val.txt", "--reward", "jpeg_incompressibility",
             "--steps", "2", "--images-per-prompt", "1"]
    code, lines = run(main, ["eval", *valid, *flags], capsys)
    assert_one_error_line(code, lines, 2, "loopdiff eval", texts)
    assert not loads, "the model must not load before the input is checked"
