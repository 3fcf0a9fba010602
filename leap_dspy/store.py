"""Crash-safe files for a run folder.

Whole files are written to a temporary name and renamed into place, so a reader sees the old file or the
new one, never half of one. Record logs are JSONL appended one flushed line at a time and keyed: a run killed
mid-write leaves at most one torn last line, which `load` drops (and repairs on disk) so that the record is
simply produced again on resume; loading keeps one record per key, so nothing is duplicated either. A bad
line anywhere else is moved aside to `<log>.corrupt`, loudly, never silently cut with what follows it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path, PurePath
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


def yaml_plain(value: Any) -> Any:
    """`value` as a YAML file stores and reads it back: paths as text, tuples as lists, so that a run's recorded
    environment options compare equal to the same options given again."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {k: yaml_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [yaml_plain(v) for v in value]
    return value


class RunFileError(ValueError):
    """A run's file that cannot be used (corrupt, from a newer leap-dspy, from another configuration): the
    message names it and what to do."""


def read_json(path: str | Path) -> dict[str, Any]:
    """A run's JSON file (metrics, a training result, the chosen round): a mapping, with the numbers a stage's
    metrics hold (`*_success`, `*_score`, ...) as numbers, or a `RunFileError` that names the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(f"{path} is corrupt ({exc}); delete it (or its stage folder) and run again to "
                          "produce it anew") from exc
    wrong = ("it holds " + type(data).__name__) if not isinstance(data, dict) else next(
        (f"its {k} is {v!r}" for k, v in data.items()
         if k.endswith(NUMERIC_SUFFIXES) and v is not None and (isinstance(v, bool) or not isinstance(v, int | float))),
        None)
    if wrong:
        raise RunFileError(f"{path} is not what leap-dspy wrote there ({wrong}); delete it (or its stage folder) "
                           "and run again to produce it anew")
    return data


NUMERIC_SUFFIXES = ("_success", "_score", "_steps", "_episodes", "_s", "_mb")


class JsonlLog(Generic[M]):
    """An append-only, keyed log of pydantic records."""

    def __init__(self, path: str | Path, model: type[M], key: Callable[[M], str]) -> None:
        self.path = Path(path)
        self.model = model
        self.key = key
        self._lock = threading.Lock()

    def load(self, repair: bool = True) -> dict[str, M]:
        """Every complete record, one per key (the last written wins). A torn last line (a write cut by a kill)
        is cut off on disk; an unreadable line before it (a disk error, a hand edit, another version's
        record) is moved to `<log>.corrupt` with a warning, and every other record is kept. `repair=False`
        (a reader such as `report`, which must not change a run) only warns and leaves the file as it is."""
        records: dict[str, M] = {}
        if not self.path.exists():
            return records
        raw = self.path.read_bytes()
        lines = raw.splitlines(keepends=True)
        torn = bool(lines) and not lines[-1].endswith(b"\n")
        good, bad = [], []
        for number, line in enumerate(lines[:-1] if torn else lines, start=1):
            try:
                record = self.model.model_validate_json(line)
            except ValueError:
                bad.append((number, line))
                continue
            records[self.key(record)] = record
            good.append(line)
        if not repair and (bad or torn):
            from leap_dspy.progress import console

            console.print(f"[yellow]warning:[/yellow] {self.path}: {len(bad) + torn} unreadable line(s) left out",
                          soft_wrap=True, highlight=False)
        elif bad:
            self._move_aside(bad, good, torn)
        elif torn:
            with self._lock, open(self.path, "r+b") as handle:
                handle.truncate(len(raw) - len(lines[-1]))
        return records

    def _move_aside(self, bad: list[tuple[int, bytes]], good: list[bytes], torn: bool) -> None:
        corrupt = self.path.with_name(self.path.name + ".corrupt")
        with self._lock:
            with open(corrupt, "ab") as handle:
                handle.writelines(line if line.endswith(b"\n") else line + b"\n" for _, line in bad)
            atomic_write_text(self.path, b"".join(good).decode("utf-8", errors="replace"))
        from leap_dspy.progress import console

        where = ", ".join(str(n) for n, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        console.print(f"[yellow]warning:[/yellow] {self.path}: {len(bad)} unreadable line(s) (line {where}) moved "
                      f"to {corrupt.name}; the other records are kept, and a stage not yet finished produces the "
                      "missing ones again"
                      + (" (and a torn last line was cut)" if torn else ""), soft_wrap=True, highlight=False)

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
