"""Rollouts through a pool of inference servers: two real `leap-dspy serve` processes, adapters loaded at run
time, one server killed mid-rollout, and a LEAP compile whose student acts only through the pool."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from leap_dspy.lm.pool import ServerPool
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import rollout
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.keybox import KeyBox  # noqa: E402

TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 2, "max_steps": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "leap_dspy", "serve", model, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("serve did not start")


@pytest.fixture()
def two_servers(tiny_model: str):
    servers = [start_server(tiny_model) for _ in range(2)]
    yield servers
    for process, _ in servers:
        process.kill()
        process.wait(10)


def random_adapter(model: str, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(str(out))
    return out


def test_a_pool_spreads_requests_survives_a_dead_server_and_serves_each_rounds_adapter(
        two_servers, tiny_model: str, tmp_path: Path) -> None:
    (first, url1), (second, url2) = two_servers
    pool = ServerPool([url1, url2], cooldown_s=600)
    adapter = random_adapter(tiny_model, tmp_path / "adapter")
    assert pool.load_adapter("round-1", str(adapter)) == [url1, url2]
    with urllib.request.urlopen(url2 + "/v1/models", timeout=10) as response:
        assert "round-1" in [m["id"] for m in json.loads(response.read())["data"]]

    student, env = Student(), KeyBox(**TINY)
    student.set_lm(pool.lm("round-1", max_tokens=16))
    tasks = env.tasks("train") + env.tasks("seen") + env.tasks("unseen")
    killed = []

    def kill_second(_: object) -> None:  # mid-rollout, once the second server has answered a few requests
        if not killed and pool.requests[url2] >= 3:
            second.kill()
            killed.append(True)

    episodes = rollout(student, env, tasks, num_threads=4, on_trajectory=kill_second)
    assert killed and len(episodes) == len(tasks) and all(t.steps for t in episodes)  # nothing lost
    more = rollout(student, env, tasks, num_threads=4)
    assert len(more) == len(tasks) and pool.failures[url2] >= 1 and pool.retried >= 1
    assert pool.requests[url1] > pool.requests[url2]  # the dead server is left out after its failure

    # A compile whose student acts only through the pool: each stage's adapter is loaded into the live server.
    run = tmp_path / "run"
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, num_threads=4, progress=False,
                lm_kwargs={"max_new_tokens": 16}, rollout_servers=[url1, url2], evaluate_base=False, train_launcher="",
                train_config=TrainConfig(max_length=512, per_device_batch_size=8, gradient_accumulation=1,
                                         progress_bar=False))
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    with urllib.request.urlopen(url1 + "/v1/models", timeout=10) as response:
        served = [m["id"] for m in json.loads(response.read())["data"]]
    assert {"run-iter_0", "run-iter_1"} <= set(served)
    assert (run / "iter_1" / "metrics.json").exists()

    # The compile's own decoding settings travel with each request: a served answer is the local engine's.
    from leap_dspy.lm import local_lm

    decoding, messages = {"no_repeat_ngram": 2, "ngram_repeats": 1}, [{"role": "user", "content": "Say more."}]
    served = pool.lm("round-1", max_tokens=24, decoding=decoding)(messages=messages)[0]
    here = local_lm(tiny_model, adapter=str(adapter), max_new_tokens=24, **decoding)(messages=messages)[0]
    plain = local_lm(tiny_model, adapter=str(adapter), max_new_tokens=24)(messages=messages)[0]
    assert served == here != plain


def test_servers_of_another_base_model_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each round's adapter is loaded onto whatever base the servers hold: a base served under another model's
    label is said, since the run would record those rollouts as its student's."""
    from leap_dspy.config import LEAPConfig
    from leap_dspy.placement import Placement

    placement = Placement(LEAPConfig(model="tiny-random"), KeyBox(**TINY), "run")
    placement._check_served_base("tiny-random")
    assert "warning" not in capsys.readouterr().err
    placement._check_served_base("tinyB")
    assert "the rollout servers serve 'tinyB', and this run trains 'tiny-random'" in " ".join(
        capsys.readouterr().err.split())


def test_a_server_cut_off_mid_answer_is_left_for_the_next(tmp_path: Path) -> None:
    """A server killed while it writes an answer leaves a short body (`http.client.IncompleteRead`, not an
    `OSError`): the request goes to the next server, as for a refused or reset connection."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer if self.server.whole else answer[:5])  # type: ignore[attr-defined]

    servers = []
    for whole in (False, True):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.whole = whole  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    pool = ServerPool([f"http://127.0.0.1:{s.server_address[1]}" for s in servers])
    try:
        assert pool.chat({"messages": []})["choices"][0]["message"]["content"] == "ok"
        assert pool.retried == 1 and sum(pool.failures.values()) == 1
    finally:
        for server in servers:
            server.shutdown()
