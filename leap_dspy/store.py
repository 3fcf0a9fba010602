"""Crash-safe files for a run folder.

Whole files are written to a temporary name and renamed into place, so a reader sees the old file or the
new one, never half of one. Record logs are JSONL appended one flushed line at a time and keyed: a run killed
mid-write leaves at most one torn last line, which `load` drops (and repairs on disk) so that the record is
simply produced again on resume; loading keeps one record per key, so nothing is duplicated either.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class JsonlLog(Generic[M]):
    """An append-only, keyed log of pydantic records."""

    def __init__(self, path: str | Path, model: type[M], key: Callable[[M], str]) -> None:
        self.path = Path(path)
        self.model = model
        self.key = key
        self._lock = threading.Lock()

    def load(self) -> dict[str, M]:
        """Every complete record, one per key (the last written wins); a torn tail is cut off on disk."""
        records: dict[str, M] = {}
        if not self.path.exists():
            return records
        raw = self.path.read_bytes()
        good_end = 0
        offset = 0
        for line in raw.splitlines(keepends=True):
            offset += len(line)
            if not line.endswith(b"\n"):
                break  # torn: written without its newline
            try:
                record = self.model.model_validate_json(line)
            except ValueError:
                break
            records[self.key(record)] = record
            good_end = offset
        if good_end < len(raw):
            with self._lock, open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def append(self, record: M) -> None:
        line = record.model_dump_json() + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())

    def extend(self, records: Iterable[M]) -> None:
        for record in records:
            self.append(record)
