"""Rewards over HTTP: ``egrpo serve-reward`` in a subprocess (end to end) or a thread, and the ``http`` reward.

Remote scores must equal in-process scores bit for bit, a training run on a served reward must log what an
in-process run logs, and every way a server can fail must end in one line that names the URL.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.errors import ConfigError
from egrpo.rewards import WeightedReward, build
from egrpo.rewards.remote import PROTOCOL, HttpReward, RemoteRewardError, RewardServer, decode_images, encode_images

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def served_by_subprocess(name, *options):
    """``python -m egrpo serve-reward NAME --port 0``: the address it prints on its first line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")  # two processes on a small machine: one thread each, or both crawl
    proc = subprocess.Popen([sys.executable, "-m", "egrpo", "serve-reward", name, "--port", "0", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(rf"serving reward {name} at (http://127\.0\.0\.1:\d+) \(protocol 1\); Ctrl-C stops it\n",
                             line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def served_in_thread(reward, name="test"):
    server = RewardServer(reward, name, {})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def alignment_url():
    with served_by_subprocess("alignment") as url:
        yield url


def _batch(n=50, seed=0):
    images = torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    images[0] = 0.0
    images[1] = 1.0
    return images, [f"a handwritten digit {'zero one two three four five six seven eight nine'.split()[i % 10]}"
                    for i in range(n)]


def test_a_subprocess_server_scores_as_the_in_process_reward_bit_for_bit(alignment_url):
    images, prompts = _batch()
    local = build("alignment")
    remote = build("http", url=alignment_url, batch_size=64)
    assert remote.info["reward"] == "alignment" and remote.info["protocol"] == PROTOCOL
    scores = remote(images, prompts)
    assert torch.equal(scores, local(images, prompts))
    assert scores.dtype == torch.float32 and scores.shape == (50,)
    # 50 images in requests of 16: four, the last of 2. A CNN's last bit depends on how many images share a
    # forward (in-process too), so the match is with the same chunks scored in-process.
    chunked = build("http", url=alignment_url, batch_size=16)(images, prompts)
    assert torch.equal(chunked, torch.cat([local(images[i : i + 16], prompts[i : i + 16]) for i in range(0, 50, 16)]))


def test_a_thread_server_scores_quality_and_png_is_exact_for_a_reward_that_rounds_to_8_bits():
    images, prompts = _batch(seed=1)
    quality = build("quality")
    with served_in_thread(quality, "quality") as url:
        assert torch.equal(build("http", url=url)(images, prompts), quality(images, prompts))
    jpeg = build("jpeg_compressibility")
    with served_in_thread(jpeg, "jpeg_compressibility") as url:
        rgb = torch.rand((6, 3, 8, 8), generator=torch.Generator().manual_seed(2))
        for batch in (images[:6], rgb):
            assert torch.equal(build("http", url=url, encoding="png")(batch, prompts[:6]), jpeg(batch, prompts[:6]))


def test_several_served_rewards_weigh_and_log_apart_as_http_label(alignment_url, tmp_path):
    images, prompts = _batch(n=26, seed=3)
    quality = build("quality")
    with served_in_thread(quality, "quality") as quality_url:
        specs = {"http-align": (0.7, {"url": alignment_url}), "http-quality": (0.3, {"url": quality_url})}
        total, parts = WeightedReward(specs).score(images, prompts)
    assert torch.equal(parts["http-align"], build("alignment")(images, prompts))
    assert torch.equal(parts["http-quality"], quality(images, prompts))
    assert torch.equal(total, 0.7 * parts["http-align"] + 0.3 * parts["http-quality"])
    config = cfg.load("embedded", ["reward={http-hps: 0.7, http-clip: 0.3}", "reward.http-hps.url=http://a:1",
                                   "reward.http-clip.url=http://b:2"])
    assert config.reward["http-hps"] == {"weight": 0.7, "url": "http://a:1"}
    with pytest.raises(ConfigError, match=r"reward.http-clip.url is not set"):  # each served reward has its own
        cfg.load("embedded", ["reward={http-hps: 0.7, http-clip: 0.3}", "reward.http-hps.url=http://a:1"])
    with pytest.raises(ConfigError, match=r"unknown reward 'http-'.*http-LABEL"):
        cfg.load("embedded", ["reward={http-: 1.0}"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_float_encoding_carries_every_bit(dtype):
    images = torch.randn((3, 2, 5, 7), generator=torch.Generator().manual_seed(0)).to(dtype)
    images[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    decoded = decode_images(json.loads(json.dumps(encode_images(images))))
    assert decoded.dtype == dtype
    assert torch.equal(decoded.view(torch.uint8), images.view(torch.uint8))


def test_training_on_the_served_reward_logs_what_the_in_process_reward_logs(alignment_url, tmp_path, tiny_overrides):
    runs = {
        "local": ["reward={alignment: 1.0}"],
        # an iteration scores 26 images (24 samples, 2 anchors) in one call; the default batch_size, 32, sends them
        # in one request, so the reward sees the batch an in-process run does
        "remote": ["reward={http: 1.0}", f"reward.http.url={alignment_url}"],
    }
    for name, reward in runs.items():
        argv = ["train", *tiny_overrides, *reward, f"output_dir={tmp_path / name}", "train.iterations=1",
                "sampling.num_steps=6"]  # 6 steps, not 16: rollouts and evaluations cost under half
        assert main([*argv, "--no-progress"]) == 0
    local, remote = (json.loads((tmp_path / n / "metrics.jsonl").read_text()) for n in runs)
    for key in ("reward_mean", "reward_std", "group_reward_std", "anchor_reward", "loss", "grad_norm"):
        assert remote[key] == local[key], key
    assert remote["reward_http"] == local["reward_alignment"]
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in runs]
    assert summaries[0]["base"] == summaries[1]["base"] and summaries[0]["final"] == summaries[1]["final"]
    weights = [load_file(str(tmp_path / n / "model.safetensors")) for n in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_stopped_server_is_one_line_naming_the_url_and_the_cli_exits_2(tmp_path, tiny_overrides, capsys):
    images, prompts = _batch(4)
    with served_in_thread(build("alignment"), "alignment") as url:
        reward = HttpReward(url, retries=1)
        reward(images, prompts)
    with pytest.raises(RemoteRewardError, match=re.escape(f"{url}/score: cannot connect") + ".*egrpo serve-reward"):
        reward(images, prompts)  # mid-run: the server went away after the reward was built
    with pytest.raises(RemoteRewardError, match=re.escape(f"{url}/info") + r".*\(after 2 tries\)"):
        HttpReward(url, retries=1)  # at start-up

    argv = ["train", *tiny_overrides, "reward={http: 1.0}", f"reward.http.url={url}", "reward.http.retries=0",
            f"output_dir={tmp_path / 'run'}", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"egrpo train: error: reward http: {url}/info: cannot connect")


class _Foreign(BaseHTTPRequestHandler):
    """A server that is not a reward server, or a broken one: answers every request with ``body``."""

    body = b""

    def do_GET(self):
        self._send()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send()

    def _send(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def foreign_server(info, score):
    """Answers /info with ``info``, anything else with ``score``."""

    class Handler(_Foreign):
        @property
        def body(self):
            return info if self.path == "/info" else score

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


INFO = json.dumps({"protocol": PROTOCOL, "reward": "x"}).encode()


@pytest.mark.parametrize("info,score,problem", [
    (b"<html>hello</html>", b"", r"/info: the answer is not JSON \(it starts b'<html>hello</html>'\); is an egrpo "
                                 r"reward server"),
    (json.dumps({"protocol": 7}).encode(), b"", " speaks protocol 7, this egrpo speaks 1"),
    (INFO, json.dumps({"protocol": 1, "scores": [0.5], "dtype": "float32"}).encode(),
     r"/score: answered 1 scores of dtype 'float32' for 2 images"),
    (INFO, b"[1, 2]", r"/score: the answer is JSON but not an object"),
])
def test_an_answer_that_is_not_the_protocol_is_an_error_naming_the_url(info, score, problem):
    with foreign_server(info, score) as url:
        with pytest.raises(RemoteRewardError, match=re.escape(url) + problem):
            build("http", url=url, retries=0)(*_batch(2))


def test_a_server_that_does_not_answer_in_time_is_a_timeout_error():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RemoteRewardError, match=re.escape(url) + r"/info: no answer within 0.2 s; raise "
                                                                     r"reward.http.timeout"):
            HttpReward(url, timeout=0.2, retries=0)


class FailsFirst:
    """A real reward whose first call fails as a GPU out of memory would."""

    def __init__(self, reward, error: Exception | None = None):
        self.reward, self.error, self.calls = reward, error or RuntimeError("CUDA out of memory"), 0

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.reward(images, prompts)


def test_a_failed_request_is_retried_and_then_scores(capfd):
    images, prompts = _batch(8)
    flaky = FailsFirst(build("quality"))
    with served_in_thread(flaky, "quality") as url:
        assert torch.equal(HttpReward(url, retries=1)(images, prompts), flaky.reward(images, prompts))
    assert flaky.calls == 2
    assert "POST /score: 500 reward quality failed: RuntimeError: CUDA out of memory" in capfd.readouterr().err


def test_a_refused_request_is_not_retried():
    refusing = FailsFirst(build("quality"), ValueError("expected images (B, 3, H, W)"))
    with served_in_thread(refusing, "quality") as url:
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 400\): bad request: reward quality: "
                                                    r"expected images"):
            HttpReward(url, retries=3)(*_batch(2))
    assert refusing.calls == 1


@pytest.mark.parametrize("options,message", [
    ({}, "reward.http.url: expected the server's address"),
    ({"url": "127.0.0.1:8000"}, "reward.http.url: expected the server's address"),
    ({"url": "http://127.0.0.1:1", "timeout": 0}, "reward.http.timeout: expected a number of seconds > 0"),
    ({"url": "http://127.0.0.1:1", "retries": -1}, "reward.http.retries: expected a whole number >= 0"),
    ({"url": "http://127.0.0.1:1", "batch_size": 0}, "reward.http.batch_size: expected a whole number >= 1"),
    ({"url": "http://127.0.0.1:1", "encoding": "jpeg"}, "reward.http.encoding: expected float or png"),
])
def test_bad_client_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("http", **options)


@pytest.mark.parametrize("argv,message", [
    (["serve-reward", "alignmnet"], "unknown reward 'alignmnet'; available: "),
    (["serve-reward", "alignment", "weight=1"], "serve-reward alignment: weight= is not an option of the reward"),
    (["serve-reward", "jpeg_compressibility", "reward.jpeg_compressibility.quality=9"],
     "reward 'jpeg_compressibility': bad options ['quality']"),
])
def test_serve_reward_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_serve_reward_on_a_taken_port_says_so(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve-reward", "jpeg_compressibility", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
