"""Where InterCode's real data lives: read at run time from the installed PyPI packages' files.

- `intercode-bench` (import name `intercode`): `assets/datasets/bash_queries.json` (24 tasks),
  `assets/docker/setup_fs.sh`, `assets/datasets/sql_queries.csv` (23 queries), `assets/datasets/spider_dev.sql`.
- `icalfa`: `assets/datasets/nl2bash_fs_{1..5}.json` with `assets/docker/setup_nl2b_fs_{1..5}.sh`.

The packages are located with `importlib.util.find_spec` on the top-level name only, which does not run their
`__init__` (that would import docker, gymnasium and scikit-learn); nothing is copied into this repository.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from leap_dspy.envs.intercode import filesystems

PIP_HINT = {
    "intercode": "pip install --no-deps intercode-bench==0.1.22",
    "icalfa": "pip install --no-deps icalfa==0.3.6",
}


class DataUnavailable(RuntimeError):
    """The package that ships the InterCode data is not installed."""


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"InterCode data package `{name}` is not installed: {PIP_HINT[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def asset(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath("assets", *parts)
    if not path.exists():
        raise DataUnavailable(f"{path} is missing from the installed `{package}`: {PIP_HINT[package]}")
    return path


@dataclass(frozen=True)
class BashRecord:
    source: str
    """`bench` (intercode-bench) or `nl2bash_fs_<k>` (icalfa)."""
    index: int
    query: str
    gold: str
    gold2: str | None
    setup: str
    """Name of the file-system setup script the task runs against (same as upstream's Docker image)."""


@cache
def bench_bash() -> tuple[BashRecord, ...]:
    rows = json.loads(asset("intercode", "datasets", "bash_queries.json").read_text())
    return tuple(
        BashRecord("bench", i, r["query"], r["gold"], None, "intercode:setup_fs.sh") for i, r in enumerate(rows)
    )


@cache
def nl2bash() -> tuple[BashRecord, ...]:
    out = []
    for k in range(1, 6):
        rows = json.loads(asset("icalfa", "datasets", f"nl2bash_fs_{k}.json").read_text())
        for i, r in enumerate(rows):
            out.append(
                BashRecord(f"nl2bash_fs_{k}", i, r["query"], r["gold"], r.get("gold2"), f"icalfa:setup_nl2b_fs_{k}.sh")
            )
    return tuple(out)


def setup_script(name: str) -> str:
    """A setup script: your own file's path, a shipped one as `package:file` (`intercode:setup_fs.sh`), or a
    generated file system's (`generated:fs-3`, filesystems.py)."""
    if name.startswith(filesystems.PREFIX):
        return filesystems.setup_script(name)
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text()
    package, _, file = name.partition(":")
    return asset(package, "docker", file).read_text()


SPLITS = ("train", "seen", "unseen")


def task_file(path: str | Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Tasks of your own in InterCode's format: a JSON list, JSON lines or a CSV whose records have `query`
    (the instruction) and `gold` (and what `required` adds), and optionally `split` (unseen when absent)."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ValueError(f"task_file {path}: {exc}") from None
    # every clone of an environment (one per episode thread) reads the file: parse it once per version
    return [dict(r) for r in _task_file(path.resolve(), stat.st_mtime_ns, stat.st_size, required)]


@cache
def _task_file(path: Path, mtime_ns: int, size: int, required: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV starts with a byte-order mark
        if path.suffix == ".csv":
            rows: Any = list(csv.DictReader(io.StringIO(text)))
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"task_file {path}: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"task_file {path}: expected a non-empty list of tasks")
    records = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        missing = [k for k in ("query", "gold", *required) if not str(row.get(k) or "").strip()]
        if missing:
            raise ValueError(f"task_file {path}, task {i}: no {', '.join(missing)}")
        record = {k: str(v).strip() for k, v in row.items() if v is not None and str(v).strip()}
        record.setdefault("split", "unseen")
        if record["split"] not in SPLITS:
            raise ValueError(f"task_file {path}, task {i}: split {record['split']!r} is not one of {', '.join(SPLITS)}")
        records.append(record)
    _check_unrepeated(path, records)
    return tuple(records)


def _check_unrepeated(path: Path, records: list[dict[str, str]]) -> None:
    """Refuse a task asked twice (the same question on the same database or file system): across splits the
    student would be graded on a task it trained on, and within one it would weigh twice."""
    first: dict[tuple, int] = {}
    for i, record in enumerate(records):
        asked = tuple(sorted((k, " ".join(v.split())) for k, v in record.items() if k not in ("split", "gold")))
        j = first.setdefault(asked, i)
        if j != i:
            where = (f"in {records[j]['split']} and again in {record['split']}: it would be graded after training "
                     "on it" if records[j]["split"] != record["split"] else f"twice in {record['split']}")
            raise ValueError(f"task_file {path}, task {i}: the same task as task {j}, {where}; keep one")


@dataclass(frozen=True)
class SQLRecord:
    index: int
    query: str
    gold: str
    db: str


@cache
def bench_sql() -> tuple[SQLRecord, ...]:
    with asset("intercode", "datasets", "sql_queries.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return tuple(SQLRecord(i, r["query"].strip(), r["gold"].strip(), r["db"].strip()) for i, r in enumerate(rows))


def spider_dump() -> Path:
    return asset("intercode", "datasets", "spider_dev.sql")
