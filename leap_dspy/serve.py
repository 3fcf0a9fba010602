"""An OpenAI-compatible HTTP server over the shared local engine: how a compiled student is deployed.

`make_server(model, adapter)` serves one model (a LoRA adapter merged in, as `local_lm` loads it) under one
name, with the standard library's `ThreadingHTTPServer`:

- `GET /v1/models` (and `/v1/models/<name>`): the served name, OpenAI's list shape.
- `POST /v1/chat/completions`: `messages`, `max_tokens` (or `max_completion_tokens`), `temperature`,
  `top_p`, `seed`, `stop`, `n` (1 only), `stream` (one content chunk, then the finish chunk and `[DONE]`).
  The prompt is the tokenizer's chat template, exactly what `local_lm` sends the same engine. A request
  without `temperature` is greedy (the engine's default), unlike OpenAI's 1.0.
- `GET /health`.

Each request runs on its own thread and calls the engine's `complete`, so concurrent requests land in the
engine's batches. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed body or bad parameters, 404 for an unknown path or model, 500 when generation fails.

Any OpenAI client reaches it, DSPy included: `dspy.LM("openai/<served name>", api_base=url + "/v1",
api_key="none")`. `leap-dspy serve runs/<name>` serves a run's final adapter (`serve_target.py`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from leap_dspy.serve_target import is_loopback, served_label

MAX_BODY_BYTES = 16 * 1024 * 1024
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` holding the engine and the served name; counts the requests it answered.

    `counts` maps a route (`chat.completions`, `models`, `health`, `error`) to how many requests it took
    (tests and monitoring read it).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: Any, served_name: str, *, api_key: str | None = None,
                 max_workers: int = 32, timeout_s: float = 60.0) -> None:
        if not api_key and not is_loopback(address[0]):
            raise ValueError(f"refusing to serve on {address[0]} without an API key: anyone who can reach it could "
                             "use the model; pass --api-key (or LEAP_DSPY_API_KEY), or bind 127.0.0.1")
        super().__init__(address, _Handler)
        self.engine = engine
        self.served_name = served_name
        self.adapters: dict[str, Any] = {}
        """LoRA adapters loaded at run time (`POST /v1/load_lora_adapter`, as vLLM has it), by served name."""
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        """Socket timeout of each connection: a client that sends nothing (or too slowly) for this long loses
        its worker."""
        self.created = int(time.time())
        self.counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        self._workers = threading.BoundedSemaphore(max_workers)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A worker thread per connection, `max_workers` at most: past that, an immediate 429."""
        if not self._workers.acquire(blocking=False):
            self.count("busy")
            _refuse(request, 429, "server busy: too many requests at once; retry shortly")
            self.shutdown_request(request)
            return
        request.settimeout(self.timeout_s)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._workers.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def authorized(self, header: str | None) -> bool:
        """The request's `Authorization: Bearer <key>`, compared in constant time; anything goes without a key."""
        if self.api_key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def count(self, route: str) -> None:
        with self._counts_lock:
            self.counts[route] = self.counts.get(route, 0) + 1

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


def make_server(model: str | None = None, adapter: str | os.PathLike | None = None, host: str = "127.0.0.1",
                port: int = 0, served_name: str | None = None, *, api_key: str | None = None, max_workers: int = 32,
                timeout_s: float = 60.0, **engine_kwargs: Any) -> tuple[OpenAIServer, str]:
    """Load (or reuse) the shared `LocalEngine` for `model` + `adapter` and bind a server to it.

    Returns `(server, url)` with the server bound but not yet serving: run `server.serve_forever()` (in a
    thread if need be), then `server.shutdown()` and `server.server_close()`. `port=0` picks a free port;
    `url` has no `/v1` (clients take `url + "/v1"`). `engine_kwargs` go to `LocalEngine` (`max_new_tokens`,
    `max_batch`, `batch_wait_s`, `dtype`, `device`, ...). Without `api_key` only a loopback `host` is served.
    """
    if not api_key and not is_loopback(host):  # before the model loads
        raise ValueError(f"refusing to serve on {host} without an API key; pass --api-key or bind 127.0.0.1")
    from leap_dspy.lm.lms import get_engine
    from leap_dspy.lm.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    engine = get_engine(model, adapter, **engine_kwargs)
    server = OpenAIServer((host, port), engine, served_name or served_label(model, adapter), api_key=api_key,
                          max_workers=max_workers, timeout_s=timeout_s)
    return server, server.url


# -- request handling ------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"
    server_version = "leap-dspy-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        if os.environ.get("LEAP_DSPY_SERVE_LOG"):
            super().log_message(format, *args)

    # routing

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            body = self._read_body()
            if path != "/health" and not self.server.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")
            if method == "GET" and path == "/health":
                self.server.count("health")
                self._send_json(200, {"status": "ok", "model": self.server.served_name})
            elif method == "GET" and path == "/v1/models":
                self.server.count("models")
                cards = [self._model_card()] + [self._model_card(name) for name in self.server.adapters]
                self._send_json(200, {"object": "list", "data": cards})
            elif method == "GET" and path.startswith("/v1/models/"):
                self.server.count("models")
                name = path.removeprefix("/v1/models/")
                self._check_model(name)
                self._send_json(200, self._model_card(name))
            elif method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
                self.server.count("chat.completions")
                self._chat(body)
            elif method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                self.server.count("adapters")
                self._adapter(path.endswith("/load_lora_adapter"), _parse_json(body))
            else:
                raise ApiError(404, f"no route {method} {path}", code="not_found")
        except ApiError as exc:
            self.server.count("error")
            self._send_json(exc.status, exc.body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:  # an engine failure: the client gets a 500 without internals, the log gets the cause
            log.exception("request %s %s failed", method, path)
            self.server.count("error")
            self._send_json(500, ApiError(500, "internal error; the server log has the cause",
                                          type="server_error").body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length header") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _model_card(self, name: str | None = None) -> dict[str, Any]:
        return {"id": name or self.server.served_name, "object": "model", "created": self.server.created,
                "owned_by": "leap-dspy"}

    def _check_model(self, name: Any) -> Any:
        """The engine serving `name`: the base one, or a LoRA adapter loaded at run time."""
        if name == self.server.served_name:
            return self.server.engine
        if name in self.server.adapters:
            return self.server.adapters[name]
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                            f"{', '.join([self.server.served_name, *self.server.adapters])}", param="model",
                       code="model_not_found")

    def _adapter(self, load: bool, request: dict[str, Any]) -> None:
        """vLLM's runtime LoRA endpoints: a new round's adapter is served under a new name, without a restart."""
        from leap_dspy.lm.lms import get_engine

        name = request.get("lora_name")
        if not isinstance(name, str) or not name or name == self.server.served_name:
            raise ApiError(400, "lora_name must be a new model name", param="lora_name")
        if not load:
            if self.server.adapters.pop(name, None) is None:
                raise ApiError(404, f"no adapter {name!r} is loaded", param="lora_name", code="model_not_found")
            self._send_json(200, {"status": "ok", "unloaded": name})
            return
        path = Path(str(request.get("lora_path") or ""))
        if not (path / "adapter_config.json").exists():
            raise ApiError(400, f"{path} is not a LoRA adapter folder", param="lora_path")
        base = self.server.engine
        settings = {k: getattr(base, k) for k in ("dtype", "max_batch", "max_new_tokens", "batching", "device")
                    if hasattr(base, k)}
        self.server.adapters[name] = get_engine(base.model, path, **settings)
        self._send_json(200, {"status": "ok", "loaded": name})

    # chat completions

    def _chat(self, body: bytes) -> None:
        request = _parse_json(body)
        engine = self._check_model(request.get("model", self.server.served_name))
        engine_request = chat_request(request, self.server.served_name)
        try:
            response = engine.complete(engine_request)
        except ValueError as exc:  # the engine's request checks (e.g. a prompt over the context length)
            raise ApiError(400, str(exc)) from exc
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        text = response.text or ""
        finish = response.finish_reason if response.finish_reason in ("stop", "length") else "stop"
        usage = {"prompt_tokens": response.usage.input_tokens or 0,
                 "completion_tokens": response.usage.output_tokens or 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if request.get("stream"):
            self._stream(completion_id, created, text, finish, usage, request)
            return
        self._send_json(200, {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.get("model", self.server.served_name),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        })

    def _stream(self, completion_id: str, created: int, text: str, finish: str, usage: dict[str, int],
                request: dict[str, Any]) -> None:
        """The whole answer as server-sent events: one content chunk, the finish chunk, usage if asked."""
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": self.server.served_name}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        ]
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            chunks.append({**base, "choices": [], "usage": usage})
        data = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _refuse(request: Any, status: int, message: str) -> None:
    """A whole HTTP error response written straight to a connection no worker will read."""
    body = json.dumps(ApiError(status, message, type="server_error").body).encode()
    head = (f"HTTP/1.1 {status} {'Too Many Requests' if status == 429 else 'Error'}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")
    try:
        request.settimeout(2.0)
        request.sendall(head.encode() + body)
    except OSError:
        pass


def _parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return request


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(
                    part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                               param=f"messages[{index}].content")
        return "".join(texts)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages[{index}].content")


def chat_request(body: dict[str, Any], model: str) -> Any:
    """An OpenAI chat-completions body -> the `dspy.lm15.Request` the engine completes (400s on bad input).

    A system message that opens the conversation becomes the request's system text; later system or
    developer messages stay in place (the engine's `request_to_messages` turns them into user turns, as
    chat templates accept a system turn only first); tool results become user turns.
    """
    from dspy.lm15 import Config, Message, Request, TextPart

    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is a required property", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    system: str | None = None
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        text = _content_text(message.get("content"), i)
        if role in ("system", "developer"):
            if i == 0:
                system = text
                continue
            turns.append(Message(role="developer", parts=(TextPart(text),)))
        elif role in ("user", "tool", "function"):
            turns.append(Message(role="user", parts=(TextPart(text),)))
        elif role == "assistant":
            turns.append(Message(role="assistant", parts=(TextPart(text),)))
        else:
            raise ApiError(400, f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, "
                                "tool", param=f"messages[{i}].role")
    if not turns:
        raise ApiError(400, "'messages' holds only a system message; add a user message", param="messages")

    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "this server returns one choice per request: n must be 1", param="n")
    if body.get("tools"):
        raise ApiError(400, "tool calling is not supported by this server", param="tools")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    try:
        config = Config(
            max_tokens=_number(max_tokens, "max_tokens", int, minimum=1),
            temperature=_number(body.get("temperature"), "temperature", float, minimum=0.0),
            top_p=_number(body.get("top_p"), "top_p", float, minimum=0.0),
            seed=_number(body.get("seed"), "seed", int),
            stop=tuple(_stop_list(stop)),
            extensions=_decoding(body) or None,
        )
        return Request(model=model, messages=tuple(turns), system=system, config=config)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"bad request: {exc}") from exc


DECODING = {"no_repeat_ngram": 0, "ngram_repeats": 1}
"""Settings of the local engine's decoding a request may carry (with their least values): a compile acting
through rollout servers sends its own, so a served student decodes as the compile's local one would."""


def _decoding(body: dict[str, Any]) -> dict[str, int]:
    return {k: _number(body[k], k, int, minimum=least) for k, least in DECODING.items() if body.get(k) is not None}


def _number(value: Any, name: str, kind: type, minimum: float | None = None) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}", param=name)
    return kind(value)


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    return stop


# -- deploying a run -------------------------------------------------------------------------------------------


__all__ = ["ApiError", "OpenAIServer", "chat_request", "make_server"]
