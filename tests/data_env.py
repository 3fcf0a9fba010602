"""An environment whose constructor reads a data file, as users' do: named on the command line by the tests."""

from __future__ import annotations

from pathlib import Path

from examples.keybox import KeyBox


class NeedsData(KeyBox):
    def __init__(self, data: str) -> None:
        if not Path(data).exists():
            raise FileNotFoundError(f"no data file {data}")
        super().__init__()
