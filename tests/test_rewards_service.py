"""Rewards in a worker thread, behind an HTTP server, and the table of rewards."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from loopdiff.rewards.async_reward import AsyncReward
from loopdiff.rewards.base import RewardError, build_reward, registered_rewards
from loopdiff.rewards.catalog import format_reward_table, reward_rows
from loopdiff.rewards.jpeg import jpeg_size_kb
from loopdiff.rewards.server import RemoteReward, RewardServer, _Handler, decode_batch, encode_batch


def eight_bit_images(n: int, seed: int = 0, size: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator) * 255).round() / 255


def mean_plus_length(images, prompts, metadata):
    """A cheap deterministic reward depending on images, prompts and metadata."""
    bonus = torch.tensor([float(m.get("bonus", 0)) for m in metadata])
    return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts], dtype=torch.float32) + bonus


# ----------------------------------------------------------------------------- AsyncReward


def test_async_results_follow_their_batches_and_order():
    calls: list[str] = []

    def slow_reward(images, prompts, metadata):
        time.sleep(0.05 if prompts[0] == "first" else 0.0)
        calls.append(prompts[0])
        return mean_plus_length(images, prompts, metadata)

    batches = [(eight_bit_images(2, seed), [name, name + "!"], [{}, {"bonus": seed}]) for seed, name in
               enumerate(["first", "second", "third"])]  # fmt: skip
    with AsyncReward(slow_reward) as rewards:
        futures = [rewards.submit(*batch) for batch in batches]
        results = [f.result(timeout=10) for f in futures]
    assert calls == ["first", "second", "third"]  # one worker: submission order
    for batch, result in zip(batches, results):
        torch.testing.assert_close(result, mean_plus_length(*batch))
        assert result.dtype == torch.float32


def test_async_copies_images_and_propagates_errors():
    release = threading.Event()

    def waiting_reward(images, prompts, metadata):
        release.wait(5)
        if prompts[0] == "bad":
            raise ValueError("reward model failed on 'bad'")
        return images.mean(dim=(1, 2, 3))

    images = eight_bit_images(3)
    expected = images.mean(dim=(1, 2, 3))
    with AsyncReward(waiting_reward, max_workers=2) as rewards:
        good = rewards.submit(images, ["ok"] * 3, [{}] * 3)
        bad = rewards.submit(images, ["bad"] * 3, [{}] * 3)
        images.zero_()  # the caller reuses its buffer at once
        release.set()
        torch.testing.assert_close(good.result(timeout=10), expected)
        with pytest.raises(ValueError, match="'bad'"):
            bad.result(timeout=10)


def test_async_checks_the_number_of_scores():
    with AsyncReward(lambda images, prompts, metadata: torch.zeros(5), name="short") as rewards:
        with pytest.raises(RewardError, match="'short' returned 5 scores for 2"):
            rewards.submit(eight_bit_images(2), ["a", "b"], [{}, {}]).result(timeout=10)
    with pytest.raises(RewardError, match="max_workers"):
        AsyncReward(mean_plus_length, max_workers=0)


# ----------------------------------------------------------------------------- server and client


@pytest.fixture
def serve():
    """Start servers on free loopback ports in threads; shut them down after the test."""
    servers: list[RewardServer] = []

    def start(reward_fn, handler=_Handler) -> RewardServer:
        server = RewardServer(reward_fn, "127.0.0.1", 0, "test", handler=handler)
        server.start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_wire_format_round_trip():
    images = eight_bit_images(2)
    metadata = [{"category": "color"}, {"seed": 3}]
    for encoding in ("uint8", "float32"):
        got, prompts, meta = decode_batch(encode_batch(images, ["a", "b"], metadata, encoding))
        torch.testing.assert_close(got, images, atol=1e-7, rtol=0)
        assert prompts == ["a", "b"] and meta == metadata


def test_remote_reward_equals_in_process_reward(serve):
    server = serve(build_reward("jpeg_compressibility"))
    images = eight_bit_images(3, size=32)
    prompts, metadata = ["a", "b", "c"], [{}] * 3
    in_process = -jpeg_size_kb(images)
    for encoding in ("uint8", "float32"):
        remote = build_reward("remote", {"remote": {"url": server.url, "encoding": encoding}})
        torch.testing.assert_close(remote(images, prompts, metadata), in_process)
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
        assert json.loads(response.read()) == {"reward": "test"}


def test_remote_reward_passes_prompts_and_metadata(serve):
    server = serve(mean_plus_length)
    images = eight_bit_images(2)
    prompts, metadata = ["a red car", "two cats"], [{"bonus": 10}, {}]
    got = RemoteReward(server.url)(images, prompts, metadata)
    torch.testing.assert_close(got, mean_plus_length(images, prompts, metadata))


def test_reward_error_on_the_server_is_not_retried(serve):
    def broken(images, prompts, metadata):
        raise RuntimeError("weights missing on the server")

    server = serve(broken)
    client = RemoteReward(server.url, retries=3, backoff=0.01)
    with pytest.raises(RewardError, match="weights missing on the server"):
        client(eight_bit_images(1), ["a"], [{}])
    assert client.attempts == 1


def failing_first_handler(first_failure: str):
    """A handler class whose first POST fails (``503`` or a stall past the client's timeout)."""
    state = {"posts": 0}

    class Handler(_Handler):
        def do_POST(self) -> None:  # noqa: N802
            state["posts"] += 1
            if state["posts"] == 1:
                if first_failure == "503":
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    self._reply(503, {"error": "warming up"})
                    return
                time.sleep(1.0)  # the client gave up after its timeout and retries
            super().do_POST()

    return Handler, state


@pytest.mark.parametrize("failure", ["503", "timeout"])
def test_client_retries_with_backoff(serve, failure):
    handler, state = failing_first_handler(failure)
    server = serve(mean_plus_length, handler=handler)
    images, prompts = eight_bit_images(2), ["x", "yy"]
    client = RemoteReward(server.url, timeout=0.5, retries=2, backoff=0.05)
    torch.testing.assert_close(client(images, prompts, [{}, {}]), mean_plus_length(images, prompts, [{}, {}]))
    assert client.attempts == 2 and state["posts"] == 2


def test_client_gives_up_after_its_retries():
    with socket.socket() as probe:  # a free port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RemoteReward(f"http://127.0.0.1:{port}", timeout=0.5, retries=2, backoff=0.01)
    with pytest.raises(RewardError, match="no answer after 3 attempts"):
        client(eight_bit_images(1), ["a"], [{}])
    with pytest.raises(RewardError, match="cannot run here: needs option url"):
        build_reward("remote")


def test_server_command_line_serves_a_registered_reward():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "loopdiff.rewards.server", "--reward", "jpeg_incompressibility",
               "--port", str(port), "--option", "quality=80"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise AssertionError(process.stderr.read().decode() if process.poll() is not None else "timeout")
                time.sleep(0.2)
        images = eight_bit_images(2, size=32)
        got = RemoteReward(f"http://127.0.0.1:{port}")(images, ["a", "b"], [{}, {}])
        torch.testing.assert_close(got, jpeg_size_kb(images, quality=80))
    finally:
        process.terminate()
        process.wait(timeout=10)


# ----------------------------------------------------------------------------- catalog


def test_reward_table_lists_every_reward_with_its_status(tmp_path):
    table = format_reward_table()
    for name in registered_rewards():
        assert any(line == name for line in table.splitlines()), name
    rows = {name: status for name, _, _, status in reward_rows()}
    assert rows["jpeg_compressibility"] == "ready"
    assert rows["remote"].startswith("unavailable: needs option url")

    missing = tmp_path / "no-blip"
    rows = {name: status for name, _, _, status in reward_rows({"blip_vqa": {"model": str(missing)}})}
    assert rows["blip_vqa"] == f"unavailable: model folder '{missing}' does not exist"
    present = tmp_path / "blip"
    present.mkdir()
    rows = {name: status for name, _, _, status in reward_rows({"blip_vqa": {"model": str(present)}})}
    assert rows["blip_vqa"] == "ready"


# ----------------------------------------------------------------------------- request size and token


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    import http.client
    from urllib.parse import urlparse

    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("POST", "/score", body=body, headers=headers)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_server_refuses_a_body_over_its_limit_unread():
    server = RewardServer(mean_plus_length, max_bytes=1000)
    server.start_in_thread()
    try:
        body = encode_batch(eight_bit_images(1), ["x"], [{}])
        assert len(body) > 1000
        status, payload = _post(server.url, b"", {"Content-Length": str(10**12)})  # never sent, never read
        assert status == 413 and "10000" in payload["error"]
        assert _post(server.url, body, {})[0] == 413
        small = RewardServer(mean_plus_length)
        small.start_in_thread()
        try:
            assert _post(small.url, body, {})[0] == 200
        finally:
            small.shutdown()
            small.server_close()
    finally:
        server.shutdown()
        server.server_close()


def test_server_with_a_token_answers_only_requests_that_carry_it(monkeypatch):
    server = RewardServer(mean_plus_length, token="s3cret")
    server.start_in_thread()
    images, prompts, metadata = eight_bit_images(2), ["a", "bb"], [{}, {}]
    try:
        body = encode_batch(images, prompts, metadata)
        assert _post(server.url, body, {})[0] == 401
        assert _post(server.url, body, {"Authorization": "Bearer wrong"})[0] == 401
        scores = RemoteReward(server.url, token="s3cret", retries=0)(images, prompts, metadata)
        torch.testing.assert_close(scores, mean_plus_length(images, prompts, metadata))
        monkeypatch.setenv("LOOPDIFF_REWARD_TOKEN", "s3cret")  # the client's default
        torch.testing.assert_close(RemoteReward(server.url, retries=0)(images, prompts, metadata), scores)
        with pytest.raises(RewardError, match="401|token"):
            RemoteReward(server.url, token="wrong", retries=0)(images, prompts, metadata)
    finally:
        server.shutdown()
        server.server_close()


def test_server_beyond_loopback_needs_a_token():
    with pytest.raises(RewardError, match="--token"):
        RewardServer(mean_plus_length, host="0.0.0.0")
    server = RewardServer(mean_plus_length, host="0.0.0.0", token="s3cret")
    server.server_close()
    RewardServer(mean_plus_length, host="127.0.0.1").server_close()


def _compressed_body(images: np.ndarray, prompts: list[str]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, prompts=np.array(json.dumps(prompts)),
                        metadata=np.array(json.dumps([{} for _ in prompts])))
    return buffer.getvalue()


def test_array_sizes_come_from_the_headers_and_match_the_decoded_arrays():
    from loopdiff.rewards.server import array_sizes

    images = np.zeros((5, 7, 9, 3), dtype=np.uint8)
    sizes = array_sizes(_compressed_body(images, ["a"] * 5))
    assert sizes["images"] == ((5, 7, 9, 3), images.nbytes)
    with np.load(io.BytesIO(_compressed_body(images, ["a"] * 5))) as data:
        assert sizes["prompts"][1] == data["prompts"].nbytes
    with pytest.raises(RewardError, match="not an .npz"):
        array_sizes(b"not a zip file")


def test_server_refuses_a_body_that_decodes_past_its_limits_before_decoding_it():
    calls = []

    def counting(images, prompts, metadata):
        calls.append(len(prompts))
        return mean_plus_length(images, prompts, metadata)

    zeros = np.zeros((200, 64, 64, 3), dtype=np.uint8)  # 2.4 MB of zeros
    bomb = _compressed_body(zeros, ["x"] * 200)
    decoded = zeros.nbytes + np.array(json.dumps(["x"] * 200)).nbytes + np.array(json.dumps([{}] * 200)).nbytes
    assert len(bomb) < 100_000
    server = RewardServer(counting, max_bytes=100_000, max_images=3)
    server.start_in_thread()
    try:
        status, payload = _post(server.url, bomb, {})
        assert status == 413 and f"{decoded} bytes" in payload["error"] and "100000" in payload["error"], payload
        four = encode_batch(eight_bit_images(4, size=8), ["x"] * 4, [{}] * 4)
        status, payload = _post(server.url, four, {})
        assert status == 413 and "4 images" in payload["error"], payload
        status, payload = _post(server.url, b"not an npz archive", {})
        assert status == 400 and "not an .npz" in payload["error"], payload
        three = encode_batch(eight_bit_images(3, size=8), ["x"] * 3, [{}] * 3)
        assert _post(server.url, three, {})[0] == 200
        assert calls == [3]  # the refused bodies never reached the reward
    finally:
        server.shutdown()
