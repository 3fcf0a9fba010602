"""Progress bars for long work (rollouts, corrections), quiet when asked or when output is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


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
