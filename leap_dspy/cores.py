"""A CPU's cores split between this process's generation and a fine-tune launched beside it.

An evaluation and the next round's fine-tune do not depend on each other, and on a few cores each leaves its
share partly idle (Python, environments, memory-bound kernels), so `Placement` runs them side by side, each on
part of the cores, and gives all of them to whichever is still working when the other ends. torch keeps its
thread count per OS thread (OpenMP's), so a count set here cannot reach the engine's worker or the trainer at
once: each reads its share when it starts its next unit of work (a generate call, an optimizer step).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TRAIN_THREADS = "LEAP_DSPY_TRAIN_THREADS"  # the file a launched trainer reads its thread count from

_generation_threads: int | None = None
_lock = threading.Lock()
_own = threading.local()  # the count a thread had before it took up a share, to go back to


def follow_generation_share() -> None:
    """Called by the thread about to generate: take up the share `SharedCores` set, or once it is gone go back
    to the count this thread had before."""
    import torch

    wanted = _generation_threads
    restore = getattr(_own, "threads", None)
    if wanted is None:
        if restore is None:
            return
        wanted, _own.threads = restore, None
    elif restore is None:
        _own.threads = torch.get_num_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@contextmanager
def generation_threads(count: int) -> Iterator[None]:
    """Generation in this process on `count` threads meanwhile: worker processes play episodes on the rest of the
    cores (`shards`)."""
    global _generation_threads
    with _lock:
        previous, _generation_threads = _generation_threads, count
    try:
        yield
    finally:
        with _lock:
            _generation_threads = previous


def idle_bf16_cores() -> bool:
    """A CPU of two threads or more that computes in bf16, no GPU: its matmuls are fast, so one engine or
    trainer leaves its cores partly idle, and a second job beside it (a fine-tune, a worker process) gains."""
    import torch

    from leap_dspy.lm.models import cpu_supports_bf16

    return torch.get_num_threads() >= 2 and not torch.cuda.is_available() and cpu_supports_bf16()


def cores_split() -> bool:
    """Whether a fine-tune beside this process holds part of the cores now (`SharedCores.run`)."""
    return _generation_threads is not None


def trainer_callbacks(most: int | None = None) -> list[Any]:
    """A TrainerCallback following the share in `$LEAP_DSPY_TRAIN_THREADS` before each step (split among the
    launcher's local processes, at most `most`); none without it."""
    path = os.environ.get(TRAIN_THREADS)
    if not path:
        return []
    import torch
    from transformers import TrainerCallback

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    class _FollowShare(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            try:
                wanted = max(1, int(Path(path).read_text()) // ranks)
            except (OSError, ValueError):
                return
            wanted = min(wanted, most or wanted)
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)

    return [_FollowShare()]


class SharedCores:
    """Runs work in this process while a launched trainer runs, the cores split between them until one ends
    (`split=False`: the work generates elsewhere, on inference servers, and the trainer keeps every core).

    The trainer's share goes through a file in its stage folder (`environ()` points the trainer at it); this
    process's through `follow_generation_share`, which the engine calls before each generate call.
    """

    def __init__(self, folder: Path, split: bool = True) -> None:
        import torch

        self.total = torch.get_num_threads()
        self.trainer_share = max(1, self.total // 2) if split else self.total  # no split: nothing generates here
        self.file = folder / "train_threads"
        self.trainer_end: float | None = None

    def environ(self) -> dict[str, str]:
        self.file.write_text(str(self.trainer_share))
        return {**os.environ, TRAIN_THREADS: str(self.file)}

    def run(self, work: Callable[[], None], process: subprocess.Popen) -> float:
        """`work` here while `process` trains; the seconds the two ran side by side."""
        global _generation_threads
        started = time.perf_counter()
        if self.trainer_share < self.total:
            _generation_threads = self.total - self.trainer_share
        threading.Thread(target=self._watch, args=(process,), daemon=True).start()
        try:
            work()
        finally:
            ended = time.perf_counter()
            self.file.write_text(str(self.total))  # the trainer takes every core from its next step
            with _lock:
                _generation_threads = None  # each thread that took up a share goes back at its next call
            import torch

            torch.set_num_threads(self.total)  # threads started from now on, and this one, start with all
        trainer_end = self.trainer_end or ended
        return max(0.0, min(ended, trainer_end) - started)

    def _watch(self, process: subprocess.Popen) -> None:
        """When the trainer ends first, generation takes every core from its next call."""
        global _generation_threads
        process.wait()
        self.trainer_end = time.perf_counter()
        with _lock:
            if _generation_threads is not None:
                _generation_threads = self.total
