"""Rewards over HTTP: ``egrpo serve-reward NAME`` serves any registered reward, the ``http`` reward scores with it.

A reward model too large or awkward to share a process with the policy (HPSv3, a VLM judge, OCR) runs as a
server, on another GPU or machine, as Flow-GRPO's reward server and verl's do. Client and server are both
here, so the protocol lives in one place.

Protocol 1, JSON over HTTP:

- ``GET /info`` -> ``{"protocol": 1, "reward": NAME, "options": {...}, "encodings": ["float", "png"],
  "egrpo": VERSION}``: a health check that also says what is served; the client asks it once, when built.
- ``POST /score`` with ``{"protocol": 1, "prompts": [B strings], "images": IMAGES}`` ->
  ``{"protocol": 1, "scores": [B numbers], "dtype": "float32"}``. IMAGES is one of

  - ``{"encoding": "float", "dtype": D, "shape": [B, C, H, W], "data": BASE64}``: the tensor's bytes,
    C-contiguous and little-endian (as on x86-64 and ARM64), D one of float32, float16, bfloat16, float64.
    The default: the server scores the very tensor the policy decoded, so a remote score equals the
    in-process score of the same batch bit for bit.
  - ``{"encoding": "png", "data": [B BASE64 strings]}``: 8-bit PNGs, grey (C = 1) or RGB (C = 3; other
    modes are converted to RGB), read back as level / 255. A quarter of the float32 bytes or less, and
    readable by a server in any language, but 8 bits: exact only for rewards that round to 8-bit levels
    first, as HPS, CLIP, PickScore, ImageReward and JPEG compressibility do (their references receive PIL
    images); the digits rewards read the float image.

  Videos (a video model's samples: K frames each) travel the same way: ``shape`` [B, K, C, H, W] for the
  float encoding, and for png ``"frames": K`` beside B x K PNGs, a video's frames in order. A server of an
  image reward scores a video as the mean of its frames' scores, as the trainer does in process
  (:func:`egrpo.video.score_frames`); a server of a video scorer gets the clips whole.

  Scores are JSON numbers, written as the shortest text that reads back to the same float (NaN and
  Infinity as Python's json writes them); ``dtype`` is the reward's own output dtype, so the client rebuilds
  the same tensor.
- Errors come back as ``{"protocol": 1, "error": MESSAGE}`` with status 400 (a malformed request, a
  protocol the server does not speak, or the reward refused the input: retrying cannot help, so the
  client does not), 404 (an unknown path) or 500 (the reward failed, e.g. out of memory: retried).

Why bytes in base64 rather than JSON lists of numbers: 4 bytes of float32 become 5.3 characters instead of
about 20, and neither side parses a number per pixel; the float path must stay lossless (above).

Why the standard library's ``ThreadingHTTPServer`` and not FastAPI + uvicorn: a reward server is one model
behind one lock, which scores one batch at a time, and the client already batches (``batch_size``); an async
framework would only queue requests at that lock, and would be one more dependency on every reward machine.
Threads still overlap the decoding of one request with the scoring of another.

The server has no authentication: it listens on 127.0.0.1 unless told otherwise; on a shared network,
reach it through an SSH tunnel or bind it to an interface only the training machines reach.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

import torch

from egrpo.errors import ConfigError
from egrpo.video import score_frames

PROTOCOL = 1
ENCODINGS = ("float", "png")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
BACKOFF_SECONDS = 0.5  # before the first retry; doubled before each next one
START_HINT = "start the server there (egrpo serve-reward NAME --port PORT) or fix reward.http.url"


class RemoteRewardError(ConnectionError):
    """The reward server could not score (down, refusing, too slow, answering nonsense); the message names the URL
    and what to do. An ``OSError``, so the CLI prints its one line and exits 2."""


class BadRequest(ValueError):
    """A request the server cannot score (answered 400, not retried by the client)."""


class _Retryable(Exception):
    """One try failed in a way another try may not (connection, timeout, 5xx, an answer that is not the protocol)."""


# ---------------------------------------------------------------------------------------------- images on the wire


def encode_images(images: torch.Tensor, encoding: str = "float") -> dict:
    """(B, C, H, W) images or (B, K, C, H, W) videos -> the ``images`` field of a score request (see the module
    docstring)."""
    if images.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, H, W) or videos (B, K, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    if encoding == "float":
        if x.dtype not in DTYPES.values():
            x = x.float()
        dtype = str(x.dtype).removeprefix("torch.")
        data = x.contiguous().view(torch.uint8).numpy().tobytes()
        return {"encoding": "float", "dtype": dtype, "shape": list(x.shape), "data": base64.b64encode(data).decode()}
    if encoding == "png":
        from PIL import Image

        frames = x.shape[1] if x.ndim == 5 else None
        x = x.flatten(0, 1) if frames else x
        if x.shape[1] not in (1, 3):
            raise ValueError(f"png encoding takes grey (C = 1) or RGB (C = 3) images, got C = {x.shape[1]}")
        levels = x.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        data = []
        for image in levels:
            buffer = io.BytesIO()
            # PNG is lossless at every level; 1 is the fastest to write
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG", compress_level=1)
            data.append(base64.b64encode(buffer.getvalue()).decode())
        return {"encoding": "png", "data": data, **({"frames": frames} if frames else {})}
    raise ValueError(f"unknown image encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def decode_images(field: object) -> torch.Tensor:
    """The ``images`` field of a score request -> a (B, C, H, W) tensor, or (B, K, C, H, W) for videos; a malformed
    field is a ``BadRequest``."""
    if not isinstance(field, dict) or field.get("encoding") not in ENCODINGS:
        raise BadRequest(f"'images' must be an object with 'encoding' one of {', '.join(ENCODINGS)}")
    if field["encoding"] == "float":
        dtype, shape, data = field.get("dtype"), field.get("shape"), field.get("data")
        if dtype not in DTYPES:
            raise BadRequest(f"images.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not (isinstance(shape, list) and len(shape) in (4, 5) and all(type(n) is int and n >= 0 for n in shape)):
            raise BadRequest(f"images.shape must be [B, C, H, W] or, for videos, [B, K, C, H, W], got {shape!r}")
        raw = _b64(data, "images.data")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if len(raw) != expected:
            raise BadRequest(f"images.data holds {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
        if not raw:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(shape)
    from PIL import Image, UnidentifiedImageError

    data = field.get("data")
    if not isinstance(data, list) or not data:
        raise BadRequest("images.data must be a non-empty list of base64 PNGs")
    arrays = []
    for i, text in enumerate(data):
        try:
            image = Image.open(io.BytesIO(_b64(text, f"images.data[{i}]")))
            image = image if image.mode == "L" else image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise BadRequest(f"images.data[{i}] is not a readable image ({exc})") from None
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        arrays.append(pixels.reshape(image.height, image.width, -1).permute(2, 0, 1))
    if len({a.shape for a in arrays}) > 1:
        raise BadRequest(f"the PNGs of one request must share size and mode, got {sorted({a.shape for a in arrays})}")
    images = torch.stack(arrays).float().div(255)
    frames = field.get("frames")
    if frames is None:
        return images
    if type(frames) is not int or frames < 1 or len(arrays) % frames:
        raise BadRequest(f"images.frames must be a whole number >= 1 dividing the {len(arrays)} PNGs, got {frames!r}")
    return images.unflatten(0, (-1, frames))


def _b64(text: object, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)  # type: ignore[arg-type]
    except (binascii.Error, TypeError, ValueError):
        raise BadRequest(f"{where} is not base64 text") from None


# ------------------------------------------------------------------------------------------------------- server


class RewardServer(ThreadingHTTPServer):
    """Serves one built reward at ``(host, port)`` (port 0: a free one; :attr:`url` says which), one batch at a time.

    ``serve_forever()`` runs it; ``shutdown()`` from another thread and ``server_close()`` stop it.
    """

    daemon_threads = True  # a client that hangs up mid-request must not keep the process alive

    def __init__(self, reward, name: str, options: dict, host: str = "127.0.0.1", port: int = 0):
        self.reward, self.name, self.options = reward, name, dict(options)
        self.lock = threading.Lock()  # one model: batches take turns on it
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        from egrpo import __version__

        return {"protocol": PROTOCOL, "reward": self.name, "options": self.options, "encodings": list(ENCODINGS),
                "egrpo": __version__}

    def score(self, request: object) -> dict:
        """A parsed ``POST /score`` body -> the answer; a ``BadRequest`` for what the client must fix."""
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object with 'protocol', 'prompts' and 'images'")
        if request.get("protocol") != PROTOCOL:
            raise BadRequest(f"protocol {request.get('protocol')!r} is not served here; this server speaks "
                             f"protocol {PROTOCOL} (egrpo serve-reward of the same egrpo version as the client)")
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompts' must be a list of strings")
        images = decode_images(request.get("images"))
        if len(prompts) != images.shape[0]:
            raise BadRequest(f"{images.shape[0]} images but {len(prompts)} prompts")
        with self.lock:
            try:
                scores = score_frames(self.reward, images, prompts)
            except ValueError as exc:  # the rewards' way of refusing an input (shape, prompt, options)
                raise BadRequest(f"reward {self.name}: {exc}") from None
        scores = scores.detach().cpu()
        if tuple(scores.shape) != (len(prompts),):
            raise RuntimeError(f"reward {self.name} returned shape {tuple(scores.shape)} for {len(prompts)} images")
        if scores.dtype not in DTYPES.values():
            scores = scores.float()
        return {"protocol": PROTOCOL, "scores": scores.tolist(), "dtype": str(scores.dtype).removeprefix("torch.")}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/info":
            self._answer(200, self.server.info())
        else:
            self._answer(404, {"protocol": PROTOCOL, "error": f"no {self.path} here; GET /info or POST /score"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._answer(404, {"protocol": PROTOCOL, "error": f"no {self.path} here; GET /info or POST /score"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._fail(400, "bad request: a JSON body with its Content-Length is needed")
            return
        try:
            answer = self.server.score(json.loads(self.rfile.read(int(length))))
        except ValueError as exc:  # BadRequest, and JSON that does not parse
            self._fail(400, f"bad request: {exc}")
        except Exception as exc:  # the reward itself failed: the client retries, the operator reads the traceback
            traceback.print_exc()
            self._fail(500, f"reward {self.server.name} failed: {type(exc).__name__}: {exc}")
        else:
            self._answer(200, answer)

    def _fail(self, status: int, message: str) -> None:
        print(f"egrpo serve-reward: {self.command} {self.path}: {status} {message}", file=sys.stderr, flush=True)
        self._answer(status, {"protocol": PROTOCOL, "error": message})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body, default=str).encode()  # an option YAML read as a date, say, still shows in /info
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        """Quiet: a training run sends a request per batch; failures are printed by ``_fail``."""


# ------------------------------------------------------------------------------------------------------- client


class HttpReward:
    """The reward a server (``egrpo serve-reward NAME``) computes, as a local reward.

    Options: ``url`` (required: the address the server printed, e.g. ``http://127.0.0.1:8000``), ``timeout``
    (seconds per request), ``retries`` (further tries of a failed request, after 0.5 s, 1 s, 2 s, ...),
    ``batch_size`` (images per request) and ``encoding`` (``float``: exact; ``png``: 8-bit, smaller).
    The server is asked for ``/info`` when the reward is built, so a wrong URL stops a run before its first
    rollout. Scores come back on the images' device. They equal the in-process reward's bit for bit when each
    request holds the batch the in-process reward would see (``batch_size`` at least the images scored at once):
    a network's last bit can depend on how many images share its forward pass. Videos are sent whole (the server
    of an image reward averages their frames' scores), ``batch_size`` videos a request.
    """

    takes_video = True  # egrpo.video.score_frames hands it the clips; the server decides how to score them

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        batch_size: int = 32,
        encoding: str = "float",
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"reward.http.url: expected the server's address, e.g. reward.http.url=http://127.0.0.1:8000 "
                f"(egrpo serve-reward NAME prints it), got {url!r}"
            )
        checks = [
            ("timeout", timeout, "a number of seconds > 0",
             isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0),
            ("retries", retries, "a whole number >= 0", type(retries) is int and retries >= 0),
            ("batch_size", batch_size, "a whole number >= 1", type(batch_size) is int and batch_size >= 1),
            ("encoding", encoding, " or ".join(ENCODINGS), encoding in ENCODINGS),
        ]
        for option, value, expected, ok in checks:
            if not ok:
                raise ConfigError(f"reward.http.{option}: expected {expected}, got {value!r}")
        self.url, self.timeout, self.retries = url.rstrip("/"), float(timeout), retries
        self.batch_size, self.encoding = batch_size, encoding
        # Direct connections: a proxy set for the internet does not reach a reward server inside the cluster.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.info = self._request("/info")
        if self.info.get("protocol") != PROTOCOL:
            raise RemoteRewardError(
                f"reward http: {self.url} speaks protocol {self.info.get('protocol')!r}, this egrpo speaks {PROTOCOL}; "
                "run egrpo serve-reward from the same egrpo version as the training"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim not in (4, 5) or len(prompts) != images.shape[0]:
            raise ValueError(f"expected images (B, C, H, W) or videos (B, K, C, H, W) and B prompts, got "
                             f"{tuple(images.shape)} and {len(prompts)} prompts")
        scores = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk, names = images[start : start + self.batch_size], list(prompts[start : start + self.batch_size])
            body = {"protocol": PROTOCOL, "prompts": names, "images": encode_images(chunk, self.encoding)}
            answer = self._request("/score", body, expected=len(names))
            scores.append(torch.tensor(answer["scores"], dtype=DTYPES[answer["dtype"]]))
        if not scores:
            return torch.zeros(0, device=images.device)
        return torch.cat(scores).to(images.device)

    def _request(self, path: str, body: dict | None = None, expected: int | None = None) -> dict:
        """GET (``body`` None) or POST JSON to ``url + path``: the answer, after up to ``retries`` further tries;
        with ``expected``, an answer without that many scores is a failed try."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
            try:
                answer = self._try(url, data)
                if expected is not None:
                    _check_scores(answer, expected)
                return answer
            except _Retryable as exc:
                problem = str(exc)
        tries = f"{self.retries + 1} tries" if self.retries else "1 try; reward.http.retries=N tries again"
        raise RemoteRewardError(f"reward http: {url}: {problem} (after {tries})")

    def _try(self, url: str, data: bytes | None) -> dict:
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read())
            if 400 <= exc.code < 500:  # the server understood and refused: the same request fails again
                refused = f"reward http: {url} refused the request (HTTP {exc.code}): {message}"
                raise RemoteRewardError(refused) from None
            raise _Retryable(f"HTTP {exc.code}: {message}; the server's log has the details") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retryable(self._timeout_message()) from None
            raise _Retryable(f"cannot connect ({exc.reason}); {START_HINT}") from None
        except TimeoutError:
            raise _Retryable(self._timeout_message()) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise _Retryable(f"the connection broke ({type(exc).__name__}: {exc}); {START_HINT}") from None
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Retryable(
                f"the answer is not JSON (it starts {raw[:60]!r}); is an egrpo reward server (egrpo serve-reward) "
                "listening there?"
            ) from None
        if not isinstance(answer, dict):
            raise _Retryable(f"the answer is JSON but not an object ({type(answer).__name__})")
        return answer

    def _timeout_message(self) -> str:
        return (f"no answer within {self.timeout:g} s; raise reward.http.timeout or lower reward.http.batch_size, "
                "or check that the server is not stuck")


def _check_scores(answer: dict, expected: int) -> None:
    scores, dtype = answer.get("scores"), answer.get("dtype")
    if not isinstance(scores, list) or len(scores) != expected or dtype not in DTYPES:
        got = f"{len(scores)} scores" if isinstance(scores, list) else f"no 'scores' list (keys {sorted(answer)})"
        raise _Retryable(
            f"answered {got} of dtype {dtype!r} for {expected} images; is an egrpo reward server (egrpo "
            "serve-reward) listening there?"
        )
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise _Retryable(f"answered scores that are not all numbers: {scores[:4]}")


def _error_message(raw: bytes) -> str:
    """The ``error`` of an answer, or, from a server that is not a reward server, the start of its body."""
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        start = raw[:100].decode(errors="replace").strip() or "(empty body)"
        return f"{start!r}; is an egrpo reward server (egrpo serve-reward) listening there?"
