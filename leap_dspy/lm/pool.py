"""A pool of OpenAI-compatible inference servers (vLLM on GPUs, `leap-dspy serve` on CPUs) as one `dspy.LM`.

Requests spread over the servers in turn; a server that fails (refused, reset, timed out, 5xx) is left out for
`cooldown_s` and the request goes to the next one, so a dead server costs retries, not the round. Each round's
adapter is loaded into every server at run time (`POST /v1/load_lora_adapter`, vLLM's endpoint with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, and `leap-dspy serve`'s), without a restart.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from leap_dspy.lm import chat


class PoolError(RuntimeError):
    pass


class ServerPool:
    """The servers' base URLs (without `/v1`), an API key if they need one, and per-server counters."""

    def __init__(self, urls: list[str], api_key: str | None = None, timeout_s: float = 600.0,
                 cooldown_s: float = 30.0) -> None:
        if not urls:
            raise ValueError("a server pool needs at least one URL")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.api_key, self.timeout_s, self.cooldown_s = api_key, timeout_s, cooldown_s
        self.requests = dict.fromkeys(self.urls, 0)
        self.failures = dict.fromkeys(self.urls, 0)
        self.retried = 0
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._turn = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()

    def post(self, url: str, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout or self.timeout_s) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except ValueError:
            return {"text": raw.decode(errors="replace")}  # vLLM answers the adapter endpoints in plain text

    def load_adapter(self, name: str, path: str) -> list[str]:
        """Load `path` as model `name` into every live server; returns the servers that have it."""
        loaded = []
        for url in self.urls:
            try:
                self.post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=300)
                loaded.append(url)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut mid-answer
                self._mark_down(url, exc)
                last: Exception = exc
        if not loaded:
            raise PoolError(f"no server of the pool could load adapter {name!r}; the last said: {last}")
        return loaded

    def base_model(self) -> str:
        """The name the servers serve their base weights under (the first model `/v1/models` lists)."""
        last: Exception | None = None
        for url in self.urls:
            request = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {self.api_key}"}
                                             if self.api_key else {})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return str(json.loads(response.read())["data"][0]["id"])
            except (OSError, http.client.HTTPException, KeyError, IndexError, ValueError) as exc:
                self._mark_down(url, exc)
                last = exc
        raise PoolError(f"no server of the pool ({', '.join(self.urls)}) answered /v1/models; the last said: {last}"
                        + (" (is LEAP_DSPY_API_KEY the servers' key?)" if "401" in str(last) else ""))

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion from the next live server, moving on past failed ones (each tried once)."""
        last: Exception | None = None
        for attempt in range(len(self.urls)):
            url = self._next()
            with self._lock:
                self.requests[url] += 1
                self.retried += attempt > 0
            try:
                return self.post(url, "/v1/chat/completions", body)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    raise  # the request is wrong: another server would refuse it too
                last = exc
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut mid-answer
                last = exc
            self._mark_down(url, last)
        raise PoolError(f"every server of the pool failed; the last said: {last}")

    def lm(self, model: str, max_tokens: int = 256, decoding: dict[str, int] | None = None, **kwargs: Any) -> Any:
        """A `dspy.LM` whose calls go to the pool's servers as `model` (greedy, no DSPy cache); `decoding`, the
        compile's `no_repeat_ngram` and `ngram_repeats`, goes with each request (`leap-dspy serve` applies them,
        vLLM ignores them)."""
        import dspy

        return dspy.LM(f"pool/{model}", engine=PoolEngine(self, model, decoding), cache=False, temperature=0.0,
                       max_tokens=max_tokens, num_retries=0, **kwargs)

    def _next(self) -> str:
        with self._lock:
            now = time.monotonic()
            for _ in range(len(self.urls)):
                url = self.urls[next(self._turn)]
                if self._down_until[url] <= now:
                    return url
            return min(self.urls, key=self._down_until.__getitem__)  # all down: the one back soonest

    def _mark_down(self, url: str, exc: Exception | None) -> None:
        with self._lock:
            self.failures[url] += 1
            self._down_until[url] = time.monotonic() + self.cooldown_s


class PoolEngine:
    """DSPy's engine protocol (`complete(Request) -> Response`) over a `ServerPool`."""

    def __init__(self, pool: ServerPool, model: str, decoding: dict[str, int] | None = None) -> None:
        self.pool, self.model, self.decoding = pool, model, dict(decoding or {})

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        config = request.config
        body: dict[str, Any] = {"model": self.model, "messages": chat.request_to_messages(request),
                                "temperature": float(config.temperature or 0.0), **self.decoding}
        if config.max_tokens:
            body["max_tokens"] = int(config.max_tokens)
        if config.stop:
            body["stop"] = list(config.stop)
        answer = self.pool.chat(body)
        choice = (answer.get("choices") or [{}])[0]
        usage = answer.get("usage") or {}
        text = str((choice.get("message") or {}).get("content") or "")
        return Response(id=str(answer.get("id", "pool")), model=self.model, message=Message.assistant([TextPart(text)]),
                        finish_reason=choice.get("finish_reason") or "stop",
                        usage=Usage(input_tokens=usage.get("prompt_tokens"),
                                    output_tokens=usage.get("completion_tokens")))
