"""Bad inputs to the reward server's command (``python -m loopdiff.rewards.server``): one line naming the input,
exit code 2, and no server left serving. A new flag gets its rows by adding lines to ROWS."""

from __future__ import annotations

import socket

import pytest

from bad_inputs import assert_one_error_line, run
from loopdiff.rewards.server import main

PROG = "python -m loopdiff.rewards.server"
JPEG = ["--reward", "jpeg_compressibility"]

# (the command's flags, texts the error line holds); {taken}: a port another socket listens on
ROWS = {
    "no reward": ([], ["required: --reward"]),
    "unknown reward": (["--reward", "nosuch"], ["unknown reward 'nosuch'"]),
    "empty reward": (["--reward", ""], ["reward spec ''", "empty term"]),
    "reward weight that is text": (["--reward", "jpeg_compressibility:x"], ["weight 'x'", "not a number"]),
    "reward module that does not exist": (["--reward", "nosuch_mod:fn"], ["cannot import module 'nosuch_mod'"]),
    "remote reward without a url": (["--reward", "remote"], ["'remote'", "url=http://host:port"]),
    "remote reward with a url that is none": (["--reward", "remote", "--option", "url=notaurl"], ["'notaurl'"]),
    "port out of range": ([*JPEG, "--port", "99999"], ["--port", "'99999'", "0-65535"]),
    "negative port": ([*JPEG, "--port", "-1"], ["--port", "'-1'"]),
    "port that is text": ([*JPEG, "--port", "abc"], ["--port", "'abc'", "not a valid int"]),
    "port that is taken": ([*JPEG, "--port", "{taken}"], ["cannot listen on 127.0.0.1:"]),
    "no images per request": ([*JPEG, "--max-images", "0"], ["--max-images", "'0'", ">= 1"]),
    "negative size limit": ([*JPEG, "--max-bytes", "-5"], ["--max-bytes", "'-5'", ">= 1"]),
    "size limit in scientific notation": ([*JPEG, "--max-bytes", "1e9"], ["--max-bytes", "'1e9'"]),
    "option without a value": ([*JPEG, "--option", "quality"], ["--option expects key=value", "'quality'"]),
    "option without a name": ([*JPEG, "--option", "=3"], ["--option expects key=value", "'=3'"]),
    "misspelt option": ([*JPEG, "--option", "qualty=80"], ["no option 'qualty'", "quality"]),
    "option value of the wrong type": ([*JPEG, "--option", "quality=abc"], ["quality='abc'", "[1, 100]"]),
    "option value out of range": ([*JPEG, "--option", "quality=0"], ["quality=0", "[1, 100]"]),
    "open interface without a token": ([*JPEG, "--host", "0.0.0.0"], ["--host '0.0.0.0'", "--token"]),
    "every interface without a token": ([*JPEG, "--host", ""], ["reachable from other machines"]),
    "host that does not resolve": ([*JPEG, "--host", "nosuch.invalid"], ["--host", "'nosuch.invalid'"]),
    "address of another machine": ([*JPEG, "--host", "192.0.2.1", "--token", "t"], ["cannot listen on 192.0.2.1"]),
    "unknown flag": ([*JPEG, "--nosuch"], ["unrecognized arguments: --nosuch"]),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_reward_server_input_is_one_line_and_exit_code_2(row, capsys, monkeypatch) -> None:
    flags, texts = ROWS[row]
    monkeypatch.delenv("LOOPDIFF_REWARD_TOKEN", raising=False)
    served = []
    monkeypatch.setattr("loopdiff.rewards.server.RewardServer.serve_forever", lambda self: served.append(self))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = [f.format(taken=taken.getsockname()[1]) for f in flags]
        code, lines = run(main, argv, capsys)
    assert_one_error_line(code, lines, 2, PROG, texts)
    assert not served


def test_the_table_base_command_serves(capsys, monkeypatch) -> None:
    """What the rows add is what is refused: the base command with a free port starts serving."""
    served = []
    monkeypatch.setattr("loopdiff.rewards.server.RewardServer.serve_forever", lambda self: served.append(self))
    main([*JPEG, "--port", "0", "--option", "quality=80"])
    assert len(served) == 1 and served[0].reward_fn.quality == 80
    assert "serving reward 'jpeg_compressibility'" in capsys.readouterr().out
