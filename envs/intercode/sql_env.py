"""InterCode-SQL over the Spider databases of intercode-bench, in SQLite (default) or MariaDB/MySQL.

Backends (one Env class, `backend=`):
- `sqlite` (embedded): the dump converted once to one SQLite file per database (spider.py, cached under
  `~/.cache/leap-dspy/intercode` or `$LEAP_DSPY_CACHE`); each episode opens its database read-only
  (`mode=ro`, `PRAGMA query_only`), with an authorizer that allows only reads (no ATTACH/DETACH, no PRAGMA
  writes, no writes of any kind, also inside CTEs, no `load_extension`), ATTACH limited to 0 databases,
  a 10 MB value limit, and a statement timeout through the progress handler. Text columns use
  `COLLATE NOCASE`, as the dump's `utf8mb4_general_ci`; MySQL's `SHOW TABLES`, `DESCRIBE t`/`DESC t` and
  `SHOW COLUMNS FROM t` are answered so that the action grammar is the same on both backends.
- `mysql`: a MariaDB/MySQL server (Debian `mariadb-server`, started by .ci/services.sh) holding the dump
  (`python -m leap_dspy.envs.intercode --load-mysql` as an admin, `lower_case_table_names=1` as
  upstream's compose file), reached as a SELECT-only user with `max_statement_time` and a read-only session.

Action grammar (as upstream): one SQL query, or `submit`; reward at submit (or after `max_steps`) is
upstream's IoU-times-Kendall-tau of the last query's rows against the gold query's rows (reward.py), on
normalized values (Decimal/float rounded to 4 places, datetimes as text) so both backends agree.
Splits (`task_set`):
- `default`: train/seen = questions generated from templates (spider.py) over the 12 databases the benchmark
  does not use, shuffled by `seed`, cut 80/20; unseen = the 23 shipped benchmark queries and 10 generated
  questions on each of the benchmark's databases (drawn by `seed`), which no training question uses: 23 alone
  would make one episode 4 points, and tell apart neither new schemas nor new question shapes.
- `shipped`: as `default`, unseen the 23 shipped queries alone (what `default` was before 2026-12-01).
- `new-databases`: as `default`, unseen the generated questions alone: new schemas, questions of trained shapes.
- `bench`: the 23 shipped queries shuffled by `seed`, 11 train / 6 seen / 6 unseen.
- `generated`: the generated questions only, 60/20/20.
`task_file`: your own questions on the Spider databases (`data.task_file`) replace the splits they name.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
import time
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from leap_dspy.envs.intercode import data, spider
from leap_dspy.envs.intercode.common import SUBMIT, InterCodeEnv, clip, truncate
from leap_dspy.envs.intercode.expertise import SQLExpertise, describe_target, is_show_tables, schema_notes
from leap_dspy.envs.intercode.reward import normalize_rows, sql_reward
from leap_dspy.types import Observation, PrivilegedState, Split, Task

TASK_SETS = ("default", "shipped", "new-databases", "bench", "generated")
BACKENDS = ("sqlite", "mysql")
MYSQL_USER = "leap_ro"
MYSQL_HINT = (
    "InterCode-SQL backend='mysql' needs a running MariaDB/MySQL server with the Spider databases: "
    "`apt-get install -y mariadb-server`, start it, then "
    "`python -m leap_dspy.envs.intercode --load-mysql` (all done by .ci/services.sh); "
    "or use backend='sqlite'"
)
READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "foreign_key_list"}
BAD_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "sqlite_offset"}


class MySQLUnavailable(RuntimeError):
    """The MariaDB/MySQL server is not reachable or does not hold the Spider databases."""


class QueryError(Exception):
    pass


# -- SQLite backend ------------------------------------------------------------------------------------------
def _authorizer(action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None) -> int:
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in BAD_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        ok = (arg1 or "").lower() in READ_PRAGMAS and arg2 is not None and dbname in (None, "main")
        return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


@cache
def _unanswerable(golds: tuple[tuple[str, str], ...], timeout_s: float, max_rows: int) -> str | None:
    """The first of your own tasks whose gold query fails or returns no rows, said in a line: the first no query
    can answer, the second any query that returns nothing answers (generated questions without rows are dropped)."""
    backends: dict[str, SQLiteBackend] = {}
    try:
        for i, (db, gold) in enumerate(golds):
            if db not in backends:  # one connection a database, closed below
                backends[db] = SQLiteBackend(db, timeout_s, max_rows)
            try:
                rows, _ = backends[db].execute(gold)
            except QueryError as err:
                return f"task {i}: its gold query fails on {db}: {err}"
            if not rows:
                return (f"task {i}: its gold query returns no rows on {db}, so any query that returns none would be "
                        "right")
        return None
    finally:
        for backend in backends.values():
            backend.close()


class SQLiteBackend:
    def __init__(self, db: str, timeout_s: float, max_rows: int):
        path = spider.sqlite_dir() / f"{db}.sqlite"
        if not path.exists():
            raise ValueError(f"no Spider database {db!r}")
        self.timeout_s, self.max_rows = timeout_s, max_rows
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.conn.execute("PRAGMA query_only = 1")
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000_000)
        self.conn.set_authorizer(_authorizer)
        self.deadline = 0.0
        self.conn.set_progress_handler(lambda: int(time.monotonic() > self.deadline), 5000)

    def _meta(self, query: str) -> list[tuple] | None:
        q = query.strip().rstrip(";").strip()
        if re.fullmatch(r"(?i)show\s+tables", q):
            return [
                tuple(r) for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            ]
        m = re.fullmatch(r"(?i)(?:describe|desc|show\s+columns\s+from)\s+`?(\w+)`?", q)
        if m:
            rows = self.conn.execute(f'PRAGMA table_info("{m.group(1)}")').fetchall()
            if not rows:
                raise QueryError(f"Table '{m.group(1)}' doesn't exist")
            return [(r[1], r[2].lower(), "NO" if r[3] else "YES", "PRI" if r[5] else "", r[4], "") for r in rows]
        return None

    def execute(self, query: str) -> tuple[list[tuple] | None, bool]:
        """(rows or None for a statement without result, truncated)."""
        self.deadline = time.monotonic() + self.timeout_s
        try:
            meta = self._meta(query)
            if meta is not None:
                return meta, False
            cur = self.conn.execute(query)
            if cur.description is None:
                return None, False
            rows = cur.fetchmany(self.max_rows + 1)
            cur.close()
            return [tuple(r) for r in rows[: self.max_rows]], len(rows) > self.max_rows
        except sqlite3.Error as err:
            msg = str(err)
            if msg == "interrupted":
                msg = f"query timed out after {self.timeout_s:g}s"
            elif msg == "not authorized":
                msg = "not authorized: the database is read-only (only SELECT queries are allowed)"
            raise QueryError(msg) from None
        except (ValueError, OverflowError, MemoryError) as err:
            raise QueryError(str(err)) from None

    def close(self) -> None:
        self.conn.close()


# -- MariaDB/MySQL backend -----------------------------------------------------------------------------------
def mysql_params(overrides: dict[str, Any] | None = None, admin: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {
        "user": "root" if admin else MYSQL_USER,
        "password": "" if admin else MYSQL_USER,
        "connect_timeout": 5,
    }
    sock = os.environ.get("LEAP_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")
    host = os.environ.get("LEAP_MYSQL_HOST")
    if host:
        p["host"], p["port"] = host, int(os.environ.get("LEAP_MYSQL_PORT", "3306"))
    elif os.path.exists(sock):
        p["unix_socket"] = sock
    else:
        p["host"], p["port"] = "127.0.0.1", 3306
    p.update(overrides or {})
    return p


def _pymysql():
    try:
        import pymysql
    except ImportError as err:
        raise MySQLUnavailable(
            f"backend='mysql' needs the PyMySQL package (`pip install PyMySQL`). {MYSQL_HINT}"
        ) from err
    return pymysql


class MySQLBackend:
    def __init__(self, db: str, timeout_s: float, max_rows: int, params: dict[str, Any] | None = None):
        self.pymysql = _pymysql()
        self.db, self.timeout_s, self.max_rows = db, timeout_s, max_rows
        self.params = mysql_params(params)
        self._connect()

    def _connect(self) -> None:
        try:
            self.conn = self.pymysql.connect(
                database=self.db, read_timeout=self.timeout_s + 5, autocommit=True, **self.params
            )
        except self.pymysql.MySQLError as err:
            raise MySQLUnavailable(
                f"cannot connect to MariaDB/MySQL as {self.params.get('user')} ({err}). {MYSQL_HINT}"
            ) from None
        with self.conn.cursor() as cur:
            try:
                cur.execute(f"SET SESSION max_statement_time = {float(self.timeout_s)}")
            except self.pymysql.MySQLError:  # MySQL proper: milliseconds, SELECT only
                cur.execute(f"SET SESSION max_execution_time = {int(self.timeout_s * 1000)}")
            cur.execute("SET SESSION TRANSACTION READ ONLY")

    def _abandon(self, cur) -> None:
        result = getattr(cur, "_result", None)
        if result is not None:
            result.unbuffered_active = False
            cur._result = None
        with contextlib.suppress(Exception):
            self.conn.close()
        self._connect()

    def execute(self, query: str) -> tuple[list[tuple] | None, bool]:
        cur = self.conn.cursor(self.pymysql.cursors.SSCursor)
        try:
            cur.execute(query)
            if cur.description is None:
                cur.close()
                return None, False
            rows = cur.fetchmany(self.max_rows + 1)
            more = len(rows) > self.max_rows
            if more:  # do not drain a huge result: drop the connection
                self._abandon(cur)
            else:
                cur.close()
            return [tuple(r) for r in rows[: self.max_rows]], more
        except self.pymysql.MySQLError as err:
            msg = err.args[1] if len(err.args) > 1 else str(err)
            if not self.conn.open:
                self._abandon(cur)
            raise QueryError(str(msg)) from None
        except (ValueError, TypeError) as err:
            raise QueryError(str(err)) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already closed
            self.conn.close()


def split_dump_statements(text: str):
    stmt: list[str] = []
    for line in text.splitlines():
        if not stmt and (not line.strip() or line.startswith("--")):
            continue
        stmt.append(line)
        if line.rstrip().endswith(";"):
            yield "\n".join(stmt)
            stmt = []


def load_mysql(params: dict[str, Any] | None = None, force: bool = False) -> str:
    """Load spider_dev.sql into the server as an admin (default root over the unix socket) and create the
    SELECT-only user; idempotent (a marker database holds the dump's hash)."""
    import hashlib

    pymysql = _pymysql()
    dump = data.spider_dump()
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()[:12]
    try:
        conn = pymysql.connect(autocommit=True, **mysql_params(params, admin=True))
    except pymysql.MySQLError as err:
        raise MySQLUnavailable(f"cannot connect as admin ({err}). {MYSQL_HINT}") from None
    cur = conn.cursor()
    cur.execute("SELECT @@lower_case_table_names")
    if int(cur.fetchone()[0]) != 1:
        raise MySQLUnavailable("the server needs lower_case_table_names=1 (as upstream's docker compose file)")
    cur.execute("CREATE DATABASE IF NOT EXISTS leap_intercode_meta")
    cur.execute("CREATE TABLE IF NOT EXISTS leap_intercode_meta.loaded (digest VARCHAR(64) PRIMARY KEY)")
    cur.execute("SELECT count(*) FROM leap_intercode_meta.loaded WHERE digest = %s", (digest,))
    if force or cur.fetchone()[0] == 0:
        for db in spider.parse_dump(str(dump)):
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        for stmt in split_dump_statements(dump.read_text(encoding="utf-8")):
            if re.match(r"(CREATE USER|GRANT|FLUSH)\b", stmt):
                continue  # the dump's own admin/admin account is not created
            cur.execute(stmt)
        cur.execute("REPLACE INTO leap_intercode_meta.loaded VALUES (%s)", (digest,))
        status = "loaded"
    else:
        status = "already loaded"
    for host in ("localhost", "127.0.0.1"):
        cur.execute(f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'{host}' IDENTIFIED BY '{MYSQL_USER}'")
        for db in spider.parse_dump(str(dump)):
            cur.execute(f"GRANT SELECT, SHOW VIEW ON `{db}`.* TO '{MYSQL_USER}'@'{host}'")
    conn.close()
    return f"Spider databases {status} ({digest}); read-only user {MYSQL_USER}"


def mysql_ready(params: dict[str, Any] | None = None) -> str | None:
    """None when backend='mysql' can run, else the reason it cannot."""
    try:
        b = MySQLBackend("pets_1", 5, 10, params)
        b.execute("SELECT count(*) FROM student")
        b.close()
        return None
    except (MySQLUnavailable, QueryError) as err:
        return str(err)


# -- the environment -----------------------------------------------------------------------------------------
def render_rows(rows: list[tuple] | None, truncated: bool, limit: int) -> str:
    if rows is None:
        return "Query executed (no result set)."
    text = str(normalize_rows(rows))
    note = " [result cut at the row limit]" if truncated else ""
    return truncate(text, limit) + note


class InterCodeSQL(InterCodeEnv):
    name: ClassVar[str] = "intercode-sql"
    privilege_levels: ClassVar[dict[int, str]] = {
        0: "nothing",
        1: "the gold query",
        2: "the gold query and its expected result rows",
    }
    default_privilege_level: ClassVar[int] = 1

    def __init__(
        self,
        backend: str = "sqlite",
        task_set: str = "default",
        seed: int = 0,
        max_steps: int = 10,
        obs_chars: int = 400,
        timeout_s: float = 5.0,
        max_rows: int = 1000,
        mysql: dict[str, Any] | None = None,
        num_train: int | None = None,
        num_seen: int | None = None,
        notes: bool = True,
        task_file: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if task_set not in TASK_SETS:
            raise ValueError(f"task_set must be one of {TASK_SETS}, not {task_set!r}")
        self.backend, self.task_set, self.seed = backend, task_set, seed
        self.task_file = str(Path(task_file).expanduser().resolve()) if task_file else None  # runs rebuild it anywhere
        self._file_records = data.task_file(task_file, ("db",)) if task_file else []
        unknown = sorted({r["db"] for r in self._file_records} - set(spider.parse_dump(str(data.spider_dump())))
                         ) if self._file_records else []
        if unknown:
            raise ValueError(f"task_file {task_file}: {', '.join(unknown)} are not Spider databases")
        if self._file_records and backend == "sqlite":
            golds = tuple((r["db"], r["gold"]) for r in self._file_records)
            problem = _unanswerable(golds, timeout_s, max_rows)
            if problem:
                raise ValueError(f"task_file {task_file}, {problem}")
        self.max_steps, self.obs_chars = max_steps, obs_chars
        self.timeout_s, self.max_rows = timeout_s, max_rows
        self.mysql = dict(mysql or {})
        self.num_train, self.num_seen = num_train, num_seen
        self.notes = bool(notes)
        """Return `Observation.notes`: the tables and columns the database has shown in this episode and how the
        last command went. The student's prompt keeps only its last steps, and a description three steps back
        is gone from it; the names it found must not be."""
        self._splits: dict[str, list[Task]] | None = None
        self.task: Task | None = None
        self.conn: SQLiteBackend | MySQLBackend | None = None
        self._gold_cache: dict[str, list[tuple] | str] = {}

    def config(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "task_set": self.task_set,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "obs_chars": self.obs_chars,
            "timeout_s": self.timeout_s,
            "max_rows": self.max_rows,
            "mysql": self.mysql,
            "num_train": self.num_train,
            "num_seen": self.num_seen,
            "notes": self.notes,
            "task_file": self.task_file,
        }

    def _file_task(self, record: dict[str, str], index: int, split: Split) -> Task:
        source = f"file-{Path(self.task_file or 'tasks').stem}"  # never a shipped task's id
        return Task(id=f"{source}-{index}", env=self.name, split=split, instruction=record["query"],
                    gold=record["gold"], db=record["db"], source=source)

    # -- tasks -----------------------------------------------------------------------------------------------
    def _bench_tasks(self) -> list[Task]:
        return [
            Task(
                id=f"bench-{r.index}",
                env=self.name,
                split="unseen",
                instruction=r.query,
                gold=r.gold,
                db=r.db,
                source="bench",
            )
            for r in data.bench_sql()
        ]

    def _generated_tasks(self, on_bench_dbs: bool = False) -> list[Task]:
        """Template questions on the 12 databases the benchmark does not use (or on the benchmark's 8)."""
        bench_dbs = {r.db for r in data.bench_sql()}
        dbs = spider.parse_dump()
        rng = random.Random(1234)  # the question set is fixed; `seed` only shuffles the split
        out = []
        for db in sorted(dbs):
            if (db in bench_dbs) != on_bench_dbs:
                continue
            for k, (q, gold) in enumerate(spider.generate_questions(db, dbs[db], rng)):
                out.append(
                    Task(
                        id=f"gen-{db}-{k}",
                        env=self.name,
                        split="train",
                        instruction=q,
                        gold=gold,
                        db=db,
                        source="generated",
                    )
                )
        return out

    def _build_splits(self) -> dict[str, list[Task]]:
        rng = random.Random(self.seed)
        if self.task_set == "bench":
            b = self._bench_tasks()
            rng.shuffle(b)
            parts = {"train": b[:11], "seen": b[11:17], "unseen": b[17:]}
        else:
            g = self._generated_tasks()
            rng.shuffle(g)
            if self.task_set in ("default", "shipped", "new-databases"):
                cut = int(0.8 * len(g))
                new = self._sample_per_db(self._generated_tasks(on_bench_dbs=True), rng, 10)
                shipped = self._bench_tasks()
                unseen = {"default": shipped + new, "shipped": shipped, "new-databases": new}[self.task_set]
                parts = {"train": g[:cut], "seen": g[cut:], "unseen": unseen}
            else:
                a, b2 = int(0.6 * len(g)), int(0.8 * len(g))
                parts = {"train": g[:a], "seen": g[a:b2], "unseen": g[b2:]}
        return {s: [t.model_copy(update={"split": s}) for t in ts] for s, ts in parts.items()}

    @staticmethod
    def _sample_per_db(tasks: list[Task], rng: random.Random, per_db: int) -> list[Task]:
        """The same number of questions from each database, so that no one schema weighs most."""
        by_db: dict[str, list[Task]] = {}
        for t in tasks:
            by_db.setdefault(t.db or "", []).append(t)
        return [t for db in sorted(by_db) for t in rng.sample(by_db[db], min(per_db, len(by_db[db])))]

    # -- episode ---------------------------------------------------------------------------------------------
    def _open(self, db: str) -> SQLiteBackend | MySQLBackend:
        if self.backend == "sqlite":
            return SQLiteBackend(db, self.timeout_s, self.max_rows)
        return MySQLBackend(db, self.timeout_s, self.max_rows, self.mysql)

    def reset(self, task: Task) -> Observation:
        self.close()
        self.conn = self._open(task.db)
        self.task = task
        self.last: list[tuple] | str | None = None
        self.steps = 0
        self.done = False
        self.actions: list[str] = []
        self.tables: list[str] = []
        self.columns: dict[str, list[str]] = {}
        self.reward, self.success = 0.0, False
        return Observation(text=task.instruction, info={"task_id": task.id, "db": task.db}, notes=self._notes())

    def _run(self, query: str) -> tuple[list[tuple] | str | None, str]:
        assert self.conn is not None
        try:
            rows, truncated = self.conn.execute(query)
        except QueryError as err:
            msg = f"Error executing query: {err}"
            return msg, msg
        result = normalize_rows(rows) if rows is not None else None
        return result, render_rows(rows, truncated, self.obs_chars)

    def step(self, action: str) -> Observation:
        if self.task is None or self.conn is None:
            return Observation(text="No episode is running: call reset(task) first.", done=True)
        if self.done:
            return Observation(text="The episode is over.", done=True, reward=self.reward, success=self.success)
        action = (action or "").strip()
        if not action:
            return Observation(text="Empty query: give an SQL query, or `submit` to finish.")
        if "\x00" in action:
            return Observation(text="Malformed query: it contains a NUL byte.")
        if action.rstrip(";").strip().lower() == SUBMIT:
            return self._finish()
        self.steps += 1
        self.actions.append(action)
        self.last, text = self._run(action)
        self._remember(action)
        if self.steps >= self.max_steps:
            obs = self._finish()
            obs.text = text + "\n" + obs.text
            return obs
        return Observation(text=text, info={"ok": not isinstance(self.last, str)}, notes=self._notes())

    def _remember(self, action: str) -> None:
        """Keep the names a listing or a description showed (the first field of each row)."""
        if not isinstance(self.last, list):
            return
        names = [str(row[0]) for row in self.last if row]
        if is_show_tables(action):
            self.tables = names
        elif (table := describe_target(action)) is not None:
            self.columns[table] = names

    def _notes(self) -> str | None:
        if not self.notes:
            return None
        lines = schema_notes(self.tables, self.columns)
        if self.actions:
            last = self.last
            outcome = ("an error" if isinstance(last, str) else "no result set" if last is None
                       else f"{len(last)} row{'s' if len(last) != 1 else ''}")
            lines.append(f"Last command: {clip(self.actions[-1], 160)} ({outcome})")
        return "\n".join(lines)

    def _gold(self) -> list[tuple] | str:
        assert self.task is not None
        if self.task.id not in self._gold_cache:
            result, _ = self._run(self.task.gold)
            self._gold_cache[self.task.id] = result if result is not None else []
        return self._gold_cache[self.task.id]

    def _finish(self) -> Observation:
        gold = self._gold()
        reward = sql_reward(
            self.last if isinstance(self.last, list) else None, gold if isinstance(gold, list) else None
        )
        self.done, self.reward, self.success = True, reward, reward >= 0.995
        info = {"gold_error": gold if isinstance(gold, str) else None}
        return Observation(
            text=f"Submitted. Reward {reward:.2f}.", reward=reward, done=True, success=self.success, info=info
        )

    # -- expert ----------------------------------------------------------------------------------------------
    def privileged_state(self, level: int) -> PrivilegedState:
        self.check_level(level)
        sections: dict[str, str | list[str]] = {}
        if self.task is None or level == 0:
            return PrivilegedState(level=level, sections=sections)
        sections["gold query"] = self.task.gold
        if level >= 2 and self.conn is not None:
            gold = self._gold()
            sections["expected result"] = truncate(str(gold), self.obs_chars)
        return PrivilegedState(level=level, sections=sections)

    def expertise(self) -> SQLExpertise:
        """Explore the schema as the student can (`SHOW TABLES`, `DESCRIBE t`), then the gold query (see
        expertise.py); level 1, the default, has a policy of its own."""
        return SQLExpertise()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
