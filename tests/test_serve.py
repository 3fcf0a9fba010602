"""The OpenAI-compatible server over the local engine, reached over real HTTP on 127.0.0.1.

The model is the tiny random Llama: its answers are noise, so the tests check the round trip (DSPy's
LiteLLM and native clients, the PrivilegedExpert program), usage counts, batching, caching and error shapes,
never quality.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download attempts (offline)

import dspy  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from leap_dspy.cli import app  # noqa: E402
from leap_dspy.programs import PrivilegedExpert  # noqa: E402
from leap_dspy.serve import OpenAIServer, make_server  # noqa: E402
from leap_dspy.serve_target import resolve_target, served_label, vllm_command  # noqa: E402
from leap_dspy.types import PrivilegedState  # noqa: E402

MAX_NEW = 16


def start(server: OpenAIServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def stop(server: OpenAIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def served(tiny_model: str) -> Iterator[tuple[OpenAIServer, str]]:
    server, url = make_server(tiny_model, max_new_tokens=MAX_NEW)
    thread = start(server)
    yield server, url
    stop(server, thread)


def http(method: str, url: str, body: bytes | dict | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def remote_lm(server: OpenAIServer, url: str, **kwargs: Any) -> dspy.LM:
    settings = {"api_key": "x", "cache": False, "max_tokens": MAX_NEW, "temperature": 0.0, "num_retries": 0,
                **kwargs}
    return dspy.LM(f"openai/{server.served_name}", api_base=url + "/v1", **settings)


def test_models_and_health(served: tuple[OpenAIServer, str], tiny_model: str) -> None:
    server, url = served
    assert server.served_name == Path(tiny_model).name == served_label(tiny_model)
    status, body = http("GET", url + "/health")
    assert status == 200 and body["status"] == "ok"
    status, body = http("GET", url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [server.served_name]
    status, body = http("GET", f"{url}/v1/models/{server.served_name}")
    assert status == 200 and body["id"] == server.served_name and body["object"] == "model"


def test_chat_completion_shape_and_usage(served: tuple[OpenAIServer, str]) -> None:
    server, url = served
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Say hi."}]
    status, body = http("POST", url + "/v1/chat/completions",
                        {"model": server.served_name, "messages": messages, "max_tokens": 5, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == server.served_name and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    engine = server.engine
    assert usage["prompt_tokens"] == len(engine.tokenize(engine.format_prompt(messages)))  # the same template
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5

    # Greedy: the same request twice gives the same text (no cache on the server).
    again = http("POST", url + "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})[1]
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    # Content given as text parts is the same prompt.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text",
                                                                                            "text": "hi."}]}]
    same = http("POST", url + "/v1/chat/completions", {"messages": parts, "max_tokens": 5, "temperature": 0})[1]
    assert same["usage"]["prompt_tokens"] == usage["prompt_tokens"]


def test_streaming_sends_one_chunk_then_done(served: tuple[OpenAIServer, str]) -> None:
    server, url = served
    request = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line.removeprefix("data: ") for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model"),
    ("GET", "/v1/models/gpt-4o", None, 404, "model"),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v1/completions", {"prompt": "x"}, 404, None),
    ("GET", "/v1/chat/completions", None, 404, None),
])
def test_bad_requests_get_openai_errors(served: tuple[OpenAIServer, str], method: str, path: str,
                                        body: bytes | dict | None, status: int, param: str | None) -> None:
    _, url = served
    got, answer = http(method, url + path, body)
    assert got == status
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param == "model":
        assert error["code"] == "model_not_found"
    # The server is still serving after every bad request.
    assert http("GET", url + "/health")[0] == 200


def test_a_prompt_over_the_context_is_a_400_not_a_crash(served: tuple[OpenAIServer, str]) -> None:
    _, url = served
    status, body = http("POST", url + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 2})
    assert status == 400 and "tokens" in body["error"]["message"]


@pytest.mark.parametrize("engine", ["litellm", "auto"])
def test_dspy_lm_round_trip_over_http(served: tuple[OpenAIServer, str], engine: str) -> None:
    """`engine="litellm"` goes through LiteLLM's OpenAI client; "auto" is DSPy 3.4's native lm15 route."""
    server, url = served
    lm = remote_lm(server, url, engine=engine)
    before = server.counts.get("chat.completions", 0)
    start_s = time.perf_counter()
    outputs = lm("Count to three.")
    elapsed = time.perf_counter() - start_s
    assert len(outputs) == 1 and isinstance(outputs[0], str)
    assert server.counts["chat.completions"] == before + 1
    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= MAX_NEW
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert elapsed < 30


def test_privileged_expert_over_http(served: tuple[OpenAIServer, str]) -> None:
    """The LM expert runs over the served model: a Prediction, or the adapter's clean parse error (the model
    is random), after exactly one HTTP call."""
    server, url = served
    expert = PrivilegedExpert(remote_lm(server, url, engine="litellm", max_tokens=48))
    before = server.counts.get("chat.completions", 0)
    privileged = PrivilegedState(level=1, sections={"object locations": ["apple 1 is in/on fridge 1"]})
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        try:
            out = expert(task="put an apple in the sink", observation="You are in the kitchen.", history="",
                         student_reason="Look around.", student_action="look", privileged_state=privileged)
        except dspy.utils.exceptions.AdapterParseError as exc:
            assert exc.lm_response is not None  # the raw model text came back over HTTP
        else:
            assert isinstance(out, dspy.Prediction) and isinstance(out.action, str)
    assert server.counts["chat.completions"] == before + 1
    lm = expert.correct.lm
    assert "privileged_state" in lm.history[-1]["messages"][-1]["content"]  # the expert sees the privilege


def test_dspy_cache_answers_a_repeated_call_without_http(served: tuple[OpenAIServer, str], tmp_path: Path) -> None:
    server, url = served
    previous = dspy.cache
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(tmp_path / "cache"))
    try:
        lm = remote_lm(server, url, engine="litellm", cache=True)
        before = server.counts.get("chat.completions", 0)
        first = lm("A question asked twice, uniquely: 7f3c.")
        second = lm("A question asked twice, uniquely: 7f3c.")
        assert first == second
        assert server.counts["chat.completions"] == before + 1
        other = lm("A different question: 7f3c.")
        assert isinstance(other[0], str)
        assert server.counts["chat.completions"] == before + 2
        assert any((tmp_path / "cache").iterdir())  # written to the disk cache we pointed at
    finally:
        dspy.cache = previous


def test_concurrent_requests_are_batched(tiny_model: str) -> None:
    # Its own engine (other settings: a long batch wait), so the batch sizes are this test's alone.
    server, url = make_server(tiny_model, max_new_tokens=MAX_NEW, batch_wait_s=1.0)
    thread = start(server)
    try:
        engine = server.engine
        seen = len(engine.batch_sizes)
        results: list[tuple[int, Any]] = []

        def ask(i: int) -> None:
            results.append(http("POST", url + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 4}))

        workers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [status for status, _ in results] == [200] * 4
        sizes = engine.batch_sizes[seen:]
        assert sum(sizes) == 4 and max(sizes) >= 2, sizes
    finally:
        stop(server, thread)


# -- deploying a run ----------------------------------------------------------------------------------------------


def make_adapter(model: str, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_folder(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "alfworld-test"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": tiny_model, "lm": {"max_new_tokens": 12}}))
    make_adapter(tiny_model, run / "iter_0" / "adapter")
    make_adapter(tiny_model, run / "iter_1" / "adapter")
    (run / "iter_2").mkdir()  # started, no adapter yet: not the one to serve
    return run


def test_a_run_folder_serves_its_newest_adapter(run_folder: Path, tiny_model: str) -> None:
    model, adapter, engine_kwargs = resolve_target(str(run_folder))
    assert model == tiny_model and Path(adapter) == run_folder / "iter_1" / "adapter"
    assert engine_kwargs == {"max_new_tokens": 12}
    assert resolve_target(tiny_model, "/some/adapter") == (tiny_model, "/some/adapter", {})

    server, url = make_server(model, adapter, **engine_kwargs)
    thread = start(server)
    try:
        assert server.served_name == f"{Path(tiny_model).name}+adapter"
        assert server.engine.adapter == str((run_folder / "iter_1" / "adapter").resolve())
        lm = remote_lm(server, url, engine="litellm")
        assert isinstance(lm("hello")[0], str)
        assert http("POST", url + "/v1/chat/completions",
                    {"model": Path(tiny_model).name, "messages": [{"role": "user", "content": "x"}]})[0] == 404
    finally:
        stop(server, thread)


def test_vllm_command_serves_the_adapter_as_a_lora_module(run_folder: Path, tiny_model: str) -> None:
    adapter = str(run_folder / "iter_1" / "adapter")
    command = vllm_command(tiny_model, adapter, "127.0.0.1", 8001)
    assert command[:3] == ["vllm", "serve", tiny_model]
    assert "--enable-lora" in command
    lora = command[command.index("--lora-modules") + 1]
    assert lora == f"{Path(tiny_model).name}+adapter={Path(adapter).resolve()}"
    assert command[command.index("--max-lora-rank") + 1] == "8"


def test_cli_serve_errors_exit_2(run_folder: Path, tiny_model: str, tmp_path: Path) -> None:
    runner = CliRunner()

    def said(result: Any) -> str:  # rich wraps long lines at the terminal width
        return " ".join(result.output.split())

    result = runner.invoke(app, ["serve", str(run_folder), "--backend", "vllm"])
    assert result.exit_code == 2 and "needs vLLM" in said(result)
    result = runner.invoke(app, ["serve", str(run_folder), "--backend", "tgi"])
    assert result.exit_code == 2 and "--backend must be" in said(result)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text(yaml.safe_dump({"model": tiny_model}))
    result = runner.invoke(app, ["serve", str(empty)])
    assert result.exit_code == 2 and "no finished adapter" in said(result)
    result = runner.invoke(app, ["serve", tiny_model, "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "not a LoRA adapter folder" in said(result)
    result = runner.invoke(app, ["serve", str(tmp_path / "no-such-model"), "--port", "0"])
    assert result.exit_code == 2 and "cannot serve" in said(result)


def test_a_key_guards_every_route_but_health_and_no_key_means_loopback_only(tiny_model: str) -> None:
    with pytest.raises(ValueError, match="without an API key"):
        make_server(tiny_model, host="0.0.0.0", max_new_tokens=MAX_NEW)
    server, url = make_server(tiny_model, api_key="s3cret", max_new_tokens=MAX_NEW)
    thread = start(server)
    try:
        assert http("GET", url + "/health")[0] == 200
        status, body = http("GET", url + "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        request = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        wrong = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer s3cre"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=30)
        assert refused.value.code == 401
        lm = remote_lm(server, url, api_key="s3cret")
        assert isinstance(lm(messages=[{"role": "user", "content": "hi"}])[0], str)  # a real client, with the key
    finally:
        stop(server, thread)
    result = CliRunner().invoke(app, ["serve", tiny_model, "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "without an API key" in result.output


def test_a_full_pool_answers_429_and_a_silent_client_cannot_hold_a_worker(tiny_model: str) -> None:
    import socket

    server, url = make_server(tiny_model, max_workers=1, timeout_s=1.0, max_new_tokens=MAX_NEW)
    thread = start(server)
    try:
        silent = socket.create_connection(server.server_address[:2])  # connects, never sends a request
        time.sleep(0.3)
        status, body = http("GET", url + "/health")
        assert status == 429 and "busy" in body["error"]["message"]
        time.sleep(1.5)  # its socket timeout frees the worker
        assert http("GET", url + "/health")[0] == 200
        silent.close()
        assert server.counts["busy"] == 1
    finally:
        stop(server, thread)


def test_a_failing_engine_answers_500_without_its_internals(served: tuple[OpenAIServer, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = served

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret path /home/someone/model and a stack")

    monkeypatch.setattr(server.engine, "complete", explode)
    status, body = http("POST", url + "/v1/chat/completions",
                        {"model": server.served_name, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 500 and "secret" not in json.dumps(body) and body["error"]["type"] == "server_error"
