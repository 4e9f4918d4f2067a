"""Bad inputs to ``loopdiff pretrain`` (both families): one line naming the flag and the value, exit code 2,
before any stage runs. A new flag gets its rows by adding lines to ROWS."""

from __future__ import annotations

import pytest

from bad_inputs import assert_one_error_line, run
from loopdiff.cli import main

UNET, FLOW = "loopdiff pretrain", "loopdiff pretrain --family flow"

# (flags after ``pretrain``, the program the error names, texts the error line holds); {out}: a fresh folder
ROWS = {
    "no steps at all": (["--max-steps", "0"], UNET, ["--max-steps", "'0'", ">= 1"]),
    "no VAE steps": (["--vae-steps", "0"], UNET, ["--vae-steps 0", ">= 1"]),
    "negative decoder steps": (["--decoder-steps", "-1"], UNET, ["--decoder-steps -1", ">= 0"]),
    "negative noisy-caption steps": (["--noisy-caption-steps", "-1"], UNET, ["--noisy-caption-steps -1", ">= 0"]),
    "caption dropout 1": (["--caption-dropout", "1.0"], UNET, ["--caption-dropout 1.0", "[0, 1)"]),
    "caption dropout 1.5": (["--caption-dropout", "1.5"], UNET, ["--caption-dropout 1.5"]),
    "negative swap probability": (["--swap-colors-prob", "-0.1"], UNET, ["--swap-colors-prob -0.1", "[0, 1]"]),
    "wrong-colour probability 2": (["--wrong-color-prob", "2"], UNET, ["--wrong-color-prob 2.0", "[0, 1]"]),
    "NaN VAE learning rate": (["--vae-lr", "nan"], UNET, ["--vae-lr nan", "finite"]),
    "UNet learning rate 0": (["--unet-lr", "0"], UNET, ["--unet-lr 0.0", "> 0"]),
    "EMA decay 1": (["--ema-decay", "1"], UNET, ["--ema-decay 1.0", "[0, 1)"]),
    "negative seed": (["--seed", "-3"], UNET, ["--seed -3", "[0, 2**63)"]),
    "no threads": (["--threads", "0"], UNET, ["--threads 0", ">= 1"]),
    "no checkpoint interval": (["--checkpoint-every", "0"], UNET, ["--checkpoint-every 0", ">= 1"]),
    "batch size that is text": (["--vae-batch-size", "x"], UNET, ["--vae-batch-size", "'x'"]),
    "device that is no device": (["--device", "banana"], UNET, ["--device 'banana'", "cuda:N"]),
    "CUDA device this machine lacks": (["--device", "cuda:3"], UNET, ["--device 'cuda:3'"]),
    "unknown flag": (["--nosuch", "1"], UNET, ["unrecognized arguments: --nosuch 1"]),
    "unknown family": (["--family", "nosuch"], UNET, ["--family", "'nosuch'", "unet"]),
    "empty output folder": (["--output-dir", ""], UNET, ["--output-dir ''", "not empty"]),
    "output folder that is a file": (["--output-dir", "{out}/file"], UNET, ["--output-dir", "not a file"]),
    "output folder that cannot be made": (["--output-dir", "/proc/loopdiff/pretrain"], UNET,
                                          ["'/proc/loopdiff/pretrain' cannot be written"]),
    "flow: no steps at all": (["--family", "flow", "--max-steps", "0"], FLOW, ["--max-steps", "'0'"]),
    "flow: no steps": (["--family", "flow", "--steps", "0"], FLOW, ["--steps 0", ">= 1"]),
    "flow: caption dropout 1": (["--family", "flow", "--caption-dropout", "1.0"], FLOW, ["--caption-dropout 1.0"]),
    "flow: shift 0": (["--family", "flow", "--shift", "0"], FLOW, ["--shift 0.0", "> 0"]),
    "flow: no heads": (["--family", "flow", "--num-heads", "0"], FLOW, ["--num-heads 0", ">= 1"]),
    "flow: infinite logit mean": (["--family", "flow", "--logit-mean", "inf"], FLOW, ["--logit-mean inf", "finite"]),
    "flow: negative T5 length": (["--family", "flow", "--max-sequence-length", "-1"], FLOW,
                                 ["--max-sequence-length -1", ">= 0"]),
    "flow: base that is no pipeline": (["--family", "flow", "--base", "/nonexistent/pipe"], FLOW,
                                       ["--base '/nonexistent/pipe'", "model_index.json"]),
    "flow: device this machine lacks": (["--family", "flow", "--device", "mps"], FLOW, ["--device 'mps'"]),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_pretrain_input_is_one_line_and_exit_code_2(row, tmp_path, capsys, monkeypatch) -> None:
    flags, prog, texts = ROWS[row]
    (tmp_path / "file").write_text("not a folder")
    flags = [f.format(out=tmp_path) for f in flags]
    ran = []
    monkeypatch.setattr("loopdiff.embedded.pretrain.pretrain", lambda *a, **k: ran.append(a))
    monkeypatch.setattr("loopdiff.embedded.pretrain_flow.pretrain_flow", lambda *a, **k: ran.append(a))
    output = [] if "--output-dir" in flags else ["--output-dir", str(tmp_path / "pipe")]
    code, lines = run(main, ["pretrain", *output, "--threads", "1", *flags], capsys)
    assert_one_error_line(code, lines, 2, prog, texts)
    assert not ran, "no stage may run on a bad input"


def test_a_valid_command_reaches_pretraining(tmp_path, capsys, monkeypatch) -> None:
    """The table's base command is valid: what each row adds is what is refused."""
    ran = []
    monkeypatch.setattr("loopdiff.embedded.pretrain.pretrain", lambda config, resume: ran.append(config))
    code, lines = run(main, ["pretrain", "--output-dir", str(tmp_path / "pipe"), "--threads", "1",
                             "--max-steps", "3"], capsys)
    assert code == 0 and lines == [] and ran[0].vae_steps == 3 and ran[0].unet_steps == 3
