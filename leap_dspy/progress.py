"""Progress bars for long work (rollouts, corrections), quiet when asked or when output is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Off a terminal rich assumes 80 columns and cuts table headers; logs are read as often (COLUMNS still wins).
console = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 160)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yields `advance()`. Off a terminal it prints one line at the start and one at the end instead."""
    if not enabled:
        yield lambda: None
        return
    if not sys.stderr.isatty():
        done = [0]
        console.print(f"{description}: 0/{total}", highlight=False)

        def advance() -> None:
            done[0] += 1

        yield advance
        console.print(f"{description}: {done[0]}/{total} done", highlight=False)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda: progress.advance(task_id)


class _OncePerMessage(logging.Filter):
    """Lets a repeated warning through once: an untrained student truncates every answer, and DSPy would
    otherwise log one line per step of every episode."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_repeated_warnings() -> None:
    logger = logging.getLogger("dspy.clients.lm")
    if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
        logger.addFilter(_OncePerMessage("LM response was truncated"))
