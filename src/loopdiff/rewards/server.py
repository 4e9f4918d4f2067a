"""A reward server for reward models too big to share the trainer's process, and its client reward.

Server: ``python -m loopdiff.rewards.server --reward NAME --port P [--option key=value ...]`` serves
any registered reward over HTTP on loopback (``--host`` to change). ``POST /score`` takes an ``.npz``
body with

- ``images``: ``uint8 (N, H, W, 3)`` (8-bit, as PNG files would hold them) or ``float32 (N, 3, H, W)``
  in [0, 1];
- ``prompts``, ``metadata``: JSON text (a list of strings, a list of objects), stored as 0-d arrays;

and answers ``{"scores": [...]}`` (JSON). A reward error answers 500 with ``{"error": "..."}``;
``GET /health`` answers ``{"reward": NAME}``. A body larger than ``--max-bytes`` (default 512 MiB) answers
413 unread, and so does one whose arrays would decode to more than that (a compressed ``.npz`` can be far
smaller than its arrays; the sizes are read from the array headers first) or that holds more than
``--max-images`` images. With a shared token (``--token`` or ``LOOPDIFF_REWARD_TOKEN``) every request must carry
``Authorization: Bearer <token>`` (else 401); a server bound beyond loopback refuses to start without one.

Client: the registered reward ``remote`` (options ``url``, ``timeout``, ``retries``, ``backoff``,
``encoding``, ``token``, default ``LOOPDIFF_REWARD_TOKEN``) posts each batch and retries connection failures, timeouts and 502/503/504 answers
with exponential backoff (``backoff * 2**attempt`` seconds); a 500 answer (the reward itself failed)
is raised at once as a :class:`RewardError` carrying the server's message.
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from loopdiff.checks import Check, OneLineParser, at_least, flag
from loopdiff.rewards.base import RewardError, RewardFn, as_scores, build_reward, register_reward

ENCODINGS = ("uint8", "float32")
RETRY_STATUS = {502, 503, 504}
TOKEN_ENV = "LOOPDIFF_REWARD_TOKEN"
MAX_BYTES = 512 * 2**20  # a batch of 64 float32 512x512 images is 200 MiB; applies to the body and to its decoded arrays
MAX_IMAGES = 1024  # images per request


# ----------------------------------------------------------------------------- wire format


def encode_batch(
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    encoding: str = "uint8",
) -> bytes:
    """The ``.npz`` request body for a batch (``uint8`` NHWC or ``float32`` NCHW images)."""
    if encoding not in ENCODINGS:
        raise RewardError(f"remote reward: unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    x = images.detach().float().clamp(0, 1).cpu()
    if encoding == "uint8":
        array = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    else:
        array = x.contiguous().numpy()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        images=array,
        prompts=np.array(json.dumps(list(prompts))),
        metadata=np.array(json.dumps([dict(m) for m in metadata], default=str)),
    )
    return buffer.getvalue()


def array_sizes(body: bytes) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per array of an ``.npz`` body, its shape and decoded size in bytes, read from the array headers alone
    (nothing is decompressed)."""
    sizes = {}
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                sizes[name.removesuffix(".npy")] = (shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise RewardError(f"the body is not an .npz archive of arrays ({err})") from None
    return sizes


def check_decoded_size(sizes: Mapping[str, tuple[tuple[int, ...], int]], max_bytes: int, max_images: int) -> None:
    """Refuse a body whose arrays (``array_sizes`` of it) would decode to more than ``max_bytes`` or hold more
    than ``max_images`` images, before any of it is read (a compressed body can be far smaller than what it
    decodes to)."""
    total = sum(nbytes for _, nbytes in sizes.values())
    if total > max_bytes:
        raise RewardError(f"the body's arrays decode to {total} bytes, over the server's limit of {max_bytes}")
    images = sizes.get("images", ((0,), 0))[0]
    if images and images[0] > max_images:
        raise RewardError(f"the body holds {images[0]} images, over the server's limit of {max_images} per request")


def decode_batch(body: bytes) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Inverse of :func:`encode_batch`: float images ``(N, 3, H, W)`` in [0, 1], prompts, metadata."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        array = data["images"]
        prompts = json.loads(str(data["prompts"]))
        metadata = json.loads(str(data["metadata"]))
    if array.dtype == np.uint8:
        if array.ndim != 4 or array.shape[-1] != 3:
            raise RewardError(f"uint8 images must be (N, H, W, 3); got {array.shape}")
        images = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    elif array.dtype == np.float32:
        images = torch.from_numpy(array)
    else:
        raise RewardError(f"images must be uint8 or float32; got {array.dtype}")
    return images, prompts, metadata


# ----------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"

    def _authorised(self) -> bool:
        """Whether the request carries the server's token (always, when it has none); replies 401 if not."""
        token = self.server.token
        if token is None or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
            return True
        self._reply(401, {"error": "missing or wrong token: send 'Authorization: Bearer <token>'"})
        return False

    def _body(self) -> bytes | None:
        """The request body, or None after replying 400/413 to a bad or too large Content-Length."""
        text = self.headers.get("Content-Length", "")
        if not text.isdigit():
            self._reply(400, {"error": f"Content-Length {text!r} is not a byte count"})
            return None
        if int(text) > self.server.max_bytes:
            self.close_connection = True  # the body is not read
            self._reply(413, {"error": f"body of {text} bytes exceeds the server's limit of {self.server.max_bytes}"})
            return None
        return self.rfile.read(int(text))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"reward": self.server.reward_name})
        else:
            self._reply(404, {"error": f"unknown path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path}"})
            return
        body = self._body()
        if body is None:
            return
        try:
            sizes = array_sizes(body)
        except RewardError as error:
            self._reply(400, {"error": str(error)})
            return
        try:
            check_decoded_size(sizes, self.server.max_bytes, self.server.max_images)
        except RewardError as error:
            self._reply(413, {"error": str(error)})
            return
        try:
            images, prompts, metadata = decode_batch(body)
            with self.server.lock:
                scores = as_scores(self.server.reward_fn(images, prompts, metadata), len(prompts), "remote")
            self._reply(200, {"scores": scores.tolist()})
        except Exception as error:  # the client gets the message; the server keeps serving
            self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    def _reply(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet unless verbose
        if self.server.verbose:
            super().log_message(format, *args)


class RewardServer(ThreadingHTTPServer):
    """HTTP server scoring batches with ``reward_fn`` (one batch at a time; the model is not shared).

    ``token``: required of every request when given; a host other than loopback needs one.
    """

    daemon_threads = True

    def __init__(
        self,
        reward_fn: RewardFn,
        host: str = "127.0.0.1",
        port: int = 0,
        reward_name: str = "reward",
        verbose: bool = False,
        handler: type[BaseHTTPRequestHandler] = _Handler,
        token: str | None = None,
        max_bytes: int = MAX_BYTES,
        max_images: int = MAX_IMAGES,
    ):
        if not token and not _is_loopback(host):
            raise RewardError(f"reward server: --host {host} is reachable from other machines; give a shared "
                              f"--token (or {TOKEN_ENV}) that clients send, or serve on 127.0.0.1")
        super().__init__((host, port), handler)
        self.token = token or None
        self.max_bytes = max_bytes
        self.max_images = max_images
        self.reward_fn = reward_fn
        self.reward_name = reward_name
        self.verbose = verbose
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hung up (it timed out and will retry); report anything else."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_in_thread(self) -> threading.Thread:
        """Serve in a daemon thread (for tests and notebooks); stop with ``shutdown()``."""
        thread = threading.Thread(target=self.serve_forever, name="reward-server", daemon=True)
        thread.start()
        return thread


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is the loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- client


class RemoteReward:
    """Callable reward that posts batches to a :class:`RewardServer`."""

    def __init__(
        self,
        url: str,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 1.0,
        encoding: str = "uint8",
        token: str | None = None,
    ):
        if encoding not in ENCODINGS:
            raise RewardError(f"remote reward: unknown encoding {encoding!r}; expected one of {ENCODINGS}")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RewardError(f"reward 'remote': url={url!r} is not an http(s) URL; allowed: http://host:port")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.encoding = encoding
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.attempts = 0  # requests sent by the last call

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        body = encode_batch(images, prompts, metadata, self.encoding)
        payload = self._post_with_retries(body)
        return as_scores(torch.tensor(payload["scores"], dtype=torch.float32), len(prompts), "remote")

    def _post_with_retries(self, body: bytes) -> dict[str, Any]:
        self.attempts = 0
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                return self._post(body)
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUS:
                    raise RewardError(f"remote reward at {self.url}: {_error_message(error)}") from error
                last_error = error
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as error:
                last_error = error
        raise RewardError(
            f"remote reward at {self.url}: no answer after {self.attempts} attempts: {last_error}"
        ) from last_error

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/x-npz"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.url}/score", data=body, method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", str(error))
    except (ValueError, AttributeError):
        return str(error)


@register_reward(
    "remote",
    description="a reward served by `python -m loopdiff.rewards.server` (HTTP, npz batches)",
    needs="url= of a running reward server",
    check=lambda options: None if options.get("url") else "needs option url=http://host:port",
)
def remote(
    url: str | None = None,
    timeout: float = 600.0,
    retries: int = 3,
    backoff: float = 1.0,
    encoding: str = "uint8",
    token: str | None = None,
) -> RemoteReward:
    if not url:
        raise RewardError("reward 'remote' needs option url=http://host:port")
    return RemoteReward(url, timeout, retries, backoff, encoding, token)


# ----------------------------------------------------------------------------- command line


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["model=/w/blip", "batch_size=8"]`` -> ``{"model": "/w/blip", "batch_size": 8}`` (JSON values when valid);
    RewardError for a pair that is not key=value."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RewardError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _resolves(host: str) -> bool:
    """Whether ``host`` is an address, or a name that resolves to one ("" is every interface)."""
    if host == "":
        return True
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The reward server's flags, each checked as it is parsed (one-line errors, exit code 2)."""
    parser = OneLineParser(prog="python -m loopdiff.rewards.server",
                           description="Serve a registered loopdiff reward over HTTP.")
    parser.add_argument("--reward", required=True, help="registered reward name, or a weighted sum 'a:1,b:0.1'")
    parser.add_argument("--port", type=flag(int, Check(lambda v: 0 <= v <= 65535, "a TCP port, 0-65535 (0 picks a "
                                                       "free one)")), default=8085)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)",
                        type=flag(str, Check(_resolves, "an address or host name of this machine")))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="reward factory option")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"shared token clients must send (default ${TOKEN_ENV}); required beyond loopback")
    parser.add_argument("--max-bytes", type=flag(int, at_least(1)), default=MAX_BYTES,
                        help="largest request body, and largest size its arrays may decode to (default 512 MiB)")
    parser.add_argument("--max-images", type=flag(int, at_least(1)), default=MAX_IMAGES,
                        help=f"images per request (default {MAX_IMAGES})")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.token and not _is_loopback(args.host):
        parser.error(f"--host {args.host!r} is reachable from other machines: give --token (or {TOKEN_ENV})")
    try:
        options = _parse_options(args.option)
        reward_fn = build_reward(args.reward, {args.reward: options} if options else None)
        server = RewardServer(reward_fn, args.host, args.port, args.reward, args.verbose, token=args.token,
                              max_bytes=args.max_bytes, max_images=args.max_images)
    except RewardError as error:
        parser.error(str(error))
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        parser.error(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}")
    print(f"serving reward '{args.reward}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
