"""An environment whose constructor reads a data file, as users' do: named on the command line by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from examples.keybox import KeyBox


class NeedsData(KeyBox):
    def __init__(self, data: str) -> None:
        if not Path(data).exists():
            raise FileNotFoundError(f"no data file {data}")
        super().__init__()


class JammedBox(KeyBox):
    """A keybox whose every step raises: an environment's own error, wherever it runs."""

    def step(self, action: str) -> Any:
        raise RuntimeError("the lid is jammed")


class SlowBox(KeyBox):
    """A keybox whose task lists take a minute to make: a compile that is still starting when it is stopped."""

    def tasks(self, split: Any) -> Any:
        import time

        time.sleep(60)
        return super().tasks(split)


class UnlistedBox(KeyBox):
    """A keybox whose task lists cannot be made (as games that fail to generate): a line, not a traceback."""

    name = "unlisted"

    def tasks(self, split: Any) -> Any:
        raise RuntimeError("no games could be generated\nworker log: ...")


class InterruptedBox(KeyBox):
    """A keybox whose first episode is met by Ctrl-C (a real SIGINT to the compile's own process)."""

    def reset(self, task: Any) -> Any:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        return super().reset(task)
