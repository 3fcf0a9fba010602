"""Gathering concurrent requests into batches on one worker thread.

DSPy's `Parallel`/`Evaluate` and the rollout runner call `complete()` from many threads at once. A batched
forward pass on CPU costs little more than a single one (the weights are read once per step either way), so
one worker collects the pending requests and runs them together.

When to start a batch (checked whenever a request arrives or the wait times out):
- `max_batch` requests are pending; or
- as many requests are pending as `expected()` says there are concurrent clients (None = unknown); or
- no new request has arrived for `batch_wait_s` seconds (`expected_wait_s` while `expected()` is known: then
  every client will call soon, and a client still stepping its environment must not split the batch).
Requests whose generation settings differ (their `key`) go to separate batches: the oldest pending
request's key is served first, so no key starves. Within a batch, rows are put in `order` (when given) rather
than arrival order: which thread asked first is timing, and a batch's layout (its length chunks, padding and
shared prefix) changes the float rounding, so a rerun's greedy answers could otherwise differ.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class EngineClosed(RuntimeError):
    """The engine was closed while the request waited."""


@dataclass
class _Pending:
    key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)


@dataclass
class _Worker:
    thread: threading.Thread | None = None
    stop: bool = False


class Batcher:
    """A worker thread running `run_batch(key, payloads) -> results` over gathered requests.

    Any exception raised by `run_batch` is set on every future of that batch, so it reaches each waiting
    caller; a crash of the worker itself fails every pending future (nobody hangs). The worker starts on the
    first `submit` and again after `close()`.
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Any]], list[Any]],
        *,
        max_batch: int = 32,
        batch_wait_s: float = 0.05,
        expected_wait_s: float = 2.0,
        expected: Callable[[], int | None] = lambda: None,
        order: Callable[[Any], Any] | None = None,
        name: str = "leap-dspy-batcher",
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.expected_wait_s = expected_wait_s
        self.expected = expected
        self.order = order
        self.name = name
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._last_arrival = 0.0
        self._worker: _Worker | None = None
        self.batch_sizes: list[int] = []  # for benchmarks and tests

    def submit(self, key: Hashable, payload: Any) -> Any:
        """Queue one request and block until its result (or its exception) is ready."""
        item = _Pending(key, payload)
        with self._cond:
            self._ensure_worker()
            self._pending.append(item)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()
        return item.future.result()

    def recheck(self) -> None:
        """Look again at whether a batch is ready: `expected()` changed (an episode ended), and the requests
        already waiting may now be every one that will come."""
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker after its current batch; requests still waiting get `EngineClosed` at once.

        A later `submit` starts a fresh worker, so a shared engine stays usable after one user closes it.
        """
        with self._cond:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.stop = True
            self._fail_pending(EngineClosed("the local engine was closed"))
            self._cond.notify_all()
        if worker is not None and worker.thread is not threading.current_thread():
            worker.thread.join(timeout)

    # -- worker --------------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None:
            worker = _Worker()
            worker.thread = threading.Thread(target=self._loop, args=(worker,), name=self.name, daemon=True)
            self._worker = worker
            worker.thread.start()

    def _ready(self) -> bool:
        n = len(self._pending)
        if n == 0:
            return False
        if n >= self.max_batch:
            return True
        expected = self.expected()
        if expected is not None and n >= expected:
            return True
        return time.monotonic() - self._last_arrival >= self._wait_s(expected)

    def _wait_s(self, expected: int | None) -> float:
        return self.batch_wait_s if expected is None else max(self.batch_wait_s, self.expected_wait_s)

    def _take(self) -> tuple[Hashable, list[_Pending]]:
        key = self._pending[0].key
        batch = [p for p in self._pending if p.key == key][: self.max_batch]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        if self.order is not None:
            batch.sort(key=lambda p: self.order(p.payload))
        return key, batch

    def _loop(self, worker: _Worker) -> None:
        try:
            while True:
                with self._cond:
                    while not worker.stop and not self._ready():
                        if self._pending:
                            left = self._wait_s(self.expected()) - (time.monotonic() - self._last_arrival)
                            self._cond.wait(max(left, 1e-4))
                        else:
                            self._cond.wait()
                    if worker.stop:
                        return
                    key, batch = self._take()
                batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if not batch:
                    continue
                self.batch_sizes.append(len(batch))
                try:
                    results = self.run_batch(key, [p.payload for p in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
                except BaseException as exc:  # every failure must reach the callers
                    for p in batch:
                        p.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for p, result in zip(batch, results, strict=True):
                        p.future.set_result(result)
        except BaseException as exc:  # the worker dies: nobody may wait for it, and the next submit restarts it
            with self._cond:
                if self._worker is worker:
                    self._worker = None
                self._fail_pending(EngineClosed(f"the local engine's worker stopped: {exc!r}"))
            raise

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, []
        for p in pending:
            if not p.future.done():
                p.future.set_exception(exc)
