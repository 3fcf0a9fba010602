"""The Spider databases from intercode-bench's `spider_dev.sql` (a MySQL dump): parsed, loaded into SQLite
files (cached) or into a MariaDB/MySQL server, and used to generate extra training questions.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from leap_dspy.envs.intercode import data

TEXT_TYPES = ("char", "varchar", "text", "tinytext", "mediumtext", "longtext", "enum", "set")
NUM_TYPES = ("int", "integer", "smallint", "bigint", "tinyint", "decimal", "double", "float", "real", "numeric")


@dataclass
class Column:
    name: str
    type: str

    @property
    def is_text(self) -> bool:
        return self.type in TEXT_TYPES

    @property
    def is_number(self) -> bool:
        return self.type in NUM_TYPES


@dataclass
class Table:
    name: str
    sqlite_ddl: str
    columns: list[Column] = field(default_factory=list)
    foreign_keys: list[tuple[str, str, str]] = field(default_factory=list)
    """(column, referenced table, referenced column)."""
    rows: list[tuple] = field(default_factory=list)


_ESC = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


def parse_values(s: str) -> list[tuple]:
    """The tuples of a MySQL `VALUES (...),(...)` list, with MySQL's backslash escapes."""
    rows: list[tuple] = []
    i, n = 0, len(s)
    row: list | None = None
    while i < n:
        c = s[i]
        if c == "(" and row is None:
            row = []
            i += 1
        elif c == ")" and row is not None:
            rows.append(tuple(row))
            row = None
            i += 1
        elif c == "'" and row is not None:
            buf = []
            i += 1
            while i < n:
                ch = s[i]
                if ch == "\\" and i + 1 < n:
                    buf.append(_ESC.get(s[i + 1], s[i + 1]))
                    i += 2
                elif ch == "'" and i + 1 < n and s[i + 1] == "'":
                    buf.append("'")
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    buf.append(ch)
                    i += 1
            row.append("".join(buf))
        elif row is not None and c not in ", \t\n":
            m = re.match(r"[^,)]+", s[i:])
            assert m is not None
            tok = m.group(0).strip()
            i += len(m.group(0))
            if tok.upper() == "NULL":
                row.append(None)
            else:
                try:
                    row.append(int(tok))
                except ValueError:
                    row.append(float(tok))
        else:
            i += 1
    return rows


def _sqlite_column(line: str) -> tuple[str, Column] | None:
    m = re.match(r"\s*`([^`]+)`\s+([a-zA-Z]+)(\([^)]*\))?(.*?),?$", line)
    if not m:
        return None
    name, typ, args, rest = m.group(1), m.group(2).lower(), m.group(3) or "", m.group(4)
    rest = re.sub(r"COLLATE \w+|CHARACTER SET \w+|AUTO_INCREMENT|ON UPDATE CURRENT_TIMESTAMP|COMMENT '[^']*'", "", rest)
    rest = re.sub(r"\bunsigned\b", "", rest, flags=re.I)
    sql_type = "TEXT" if typ in ("enum", "set") else typ.upper() + args
    collate = " COLLATE NOCASE" if typ in TEXT_TYPES else ""
    return f'  "{name}" {sql_type}{collate} {" ".join(rest.split())}'.rstrip(), Column(name, typ)


@cache
def parse_dump(path: str | None = None) -> dict[str, dict[str, Table]]:
    """db -> table name -> Table (SQLite DDL, columns, foreign keys, rows)."""
    text = Path(path or data.spider_dump()).read_text(encoding="utf-8")
    dbs: dict[str, dict[str, Table]] = {}
    db = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"USE `([^`]+)`;", line):
            db = m.group(1)
            dbs.setdefault(db, {})
        elif (m := re.match(r"CREATE TABLE `([^`]+)` \(", line)) and db:
            name = m.group(1)
            body, cols, fks = [], [], []
            i += 1
            while not lines[i].startswith(")"):
                ln = re.sub(r"`\(\d+\)", "`", lines[i].strip().rstrip(","))  # key prefix lengths
                if ln.startswith("`"):
                    parsed = _sqlite_column(ln)
                    if parsed:
                        body.append(parsed[0])
                        cols.append(parsed[1])
                elif ln.startswith("PRIMARY KEY"):
                    body.append("  " + ln.replace("`", '"'))
                elif ln.startswith("UNIQUE KEY"):
                    body.append("  UNIQUE " + re.sub(r"UNIQUE KEY `[^`]*` ", "", ln).replace("`", '"'))
                elif ln.startswith("CONSTRAINT"):
                    fk = re.search(r"FOREIGN KEY \(`([^`]+)`\) REFERENCES `([^`]+)` \(`([^`]+)`\)", ln)
                    if fk:
                        fks.append((fk.group(1), fk.group(2), fk.group(3)))
                    body.append("  " + ln.replace("`", '"'))
                i += 1
            ddl = f'CREATE TABLE "{name}" (\n' + ",\n".join(body) + "\n)"
            dbs[db][name] = Table(name, ddl, cols, fks)
        elif (m := re.match(r"INSERT INTO `([^`]+)` VALUES (.*);$", line)) and db:
            dbs[db][m.group(1)].rows.extend(parse_values(m.group(2)))
        i += 1
    return dbs


def cache_root() -> Path:
    base = os.environ.get("LEAP_DSPY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "leap-dspy")
    return Path(base) / "intercode"


_BUILD_LOCK = threading.Lock()


def load_tables(conn: sqlite3.Connection, tables: dict[str, Table]) -> None:
    """Create the tables in `conn` and insert their rows."""
    for t in tables.values():
        conn.execute(t.sqlite_ddl)
        if t.rows:
            conn.executemany(f'INSERT INTO "{t.name}" VALUES ({",".join("?" * len(t.rows[0]))})', t.rows)


def sqlite_dir() -> Path:
    """A directory with one read-only `<db>.sqlite` per Spider database, built once and cached."""
    dump = data.spider_dump()
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()[:12]
    out = cache_root() / f"spider-sqlite-{digest}"
    with _BUILD_LOCK:
        if (out / "COMPLETE").exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".spider-", dir=out.parent))
        for db, tables in parse_dump(str(dump)).items():
            conn = sqlite3.connect(tmp / f"{db}.sqlite")
            load_tables(conn, tables)
            conn.commit()
            conn.close()
            os.chmod(tmp / f"{db}.sqlite", 0o444)
        (tmp / "COMPLETE").write_text(digest)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- generated questions -------------------------------------------------------------------------------------
def _h(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _plural(name: str) -> str:
    """The entity a table holds, in the plural a question uses ("singer" -> "singers")."""
    words = _h(name)
    if words.endswith(("s", "x", "ch", "sh")):
        return words
    if words.endswith("y") and words[-2:-1] not in ("a", "e", "o", "u"):
        return words[:-1] + "ies"
    return words + "s"


def generate_questions(db: str, tables: dict[str, Table], rng: random.Random) -> list[tuple[str, str]]:
    """Spider-style (question, gold SQL) pairs from templates over the schema and its rows.

    The questions speak of the entities and their attributes ("the names of singers whose country is
    'France'") and never name a table as such, as Spider's do: the student must find the table in the
    database's own listing, which is the skill an unseen database asks for.
    """
    out: list[tuple[str, str]] = []
    for t in tables.values():
        if not t.rows:
            continue
        out.append((f"How many {_plural(t.name)} are there?", f"SELECT count(*) FROM `{t.name}`"))
        text_cols = [c for c in t.columns if c.is_text]
        num_cols = [c for c in t.columns if c.is_number and not c.name.lower().endswith("id")]
        # The task set is fixed by the seed: `rng` is drawn text columns first, then number columns, in order.
        for c in text_cols[:2]:
            out += _text_questions(t, c, text_cols, rng)
        for c in num_cols[:2]:
            out += _number_questions(t, c, text_cols[0] if text_cols else None, rng)
        out += _join_questions(t, tables, rng)
    # Drawn from their own generator, so that the questions above keep the values they were drawn before.
    out += _path_questions(tables, random.Random(f"paths-{db}"))
    return out


def _value(t: Table, c: Column, rng: random.Random) -> str | None:
    """A text value of column `c` drawn by `rng` (None when it has none a question can quote)."""
    idx = t.columns.index(c)
    vals = sorted({r[idx] for r in t.rows if isinstance(r[idx], str) and "'" not in r[idx] and r[idx]})
    return rng.choice(vals) if vals else None


def _text_questions(t: Table, c: Column, text_cols: list[Column], rng: random.Random) -> list[tuple[str, str]]:
    """Distinct values, counts per value, a filtered count, and the other text column of the rows with a value."""
    T, tq, C = _plural(t.name), f"`{t.name}`", _h(c.name)
    out = [
        (f"List the distinct {C} of all {T}.", f"SELECT DISTINCT `{c.name}` FROM {tq}"),
        (f"For each {C}, how many {T} are there?", f"SELECT `{c.name}`, count(*) FROM {tq} GROUP BY `{c.name}`"),
    ]
    v = _value(t, c, rng)
    if v is None:
        return out
    out.append((f"How many {T} have {C} '{v}'?", f"SELECT count(*) FROM {tq} WHERE `{c.name}` = '{v}'"))
    other = next((o for o in text_cols if o is not c), None)
    if other is not None:
        out.append(
            (
                f"Find the {_h(other.name)} of the {T} whose {C} is '{v}'.",
                f"SELECT `{other.name}` FROM {tq} WHERE `{c.name}` = '{v}'",
            )
        )
        out.append(
            (
                f"What are the {C} and {_h(other.name)} of all {T}?",
                f"SELECT `{c.name}`, `{other.name}` FROM {tq}",
            )
        )
    return out


def _number_questions(t: Table, c: Column, tc: Column | None, rng: random.Random) -> list[tuple[str, str]]:
    """An aggregate (drawn by `rng`) of a number column and, given a text column `tc`, orderings and a
    threshold on it."""
    T, tq, C = _plural(t.name), f"`{t.name}`", _h(c.name)
    agg, word = rng.choice([("max", "maximum"), ("min", "minimum"), ("avg", "average")])
    out = [(f"What is the {word} {C} of all {T}?", f"SELECT {agg}(`{c.name}`) FROM {tq}")]
    if tc is None:
        return out
    TC, idx = _h(tc.name), t.columns.index(c)
    nums = sorted(r[idx] for r in t.rows if isinstance(r[idx], int | float) and not isinstance(r[idx], bool))
    # Several rows share the highest value: LIMIT 1 would pick one of them by the engine's whim, so the gold
    # names them all, and the question keeps its id.
    top = (
        f"ORDER BY `{c.name}` DESC LIMIT 1"
        if len(nums) < 2 or nums[-1] != nums[-2]
        else f"WHERE `{c.name}` = (SELECT max(`{c.name}`) FROM {tq})"
    )
    out += [
        (f"Show the {TC} of the {T} with the highest {C}.", f"SELECT `{tc.name}` FROM {tq} {top}"),
        (
            f"List the {TC} and {C} of all {T}, ordered by {C} ascending.",
            f"SELECT `{tc.name}`, `{c.name}` FROM {tq} ORDER BY `{c.name}` ASC",
        ),
    ]
    if nums:
        x = nums[len(nums) // 2]
        out.append(
            (
                f"Find the {TC} of the {T} whose {C} is greater than {x}.",
                f"SELECT `{tc.name}` FROM {tq} WHERE `{c.name}` > {x}",
            )
        )
    return out


def _join_questions(t: Table, tables: dict[str, Table], rng: random.Random) -> list[tuple[str, str]]:
    """Per foreign key whose table has rows and a text column: the pairs it links, and (given a text column
    of `t` and a value drawn by `rng`) the rows of `t` whose linked row has that value."""
    T, tq = _plural(t.name), f"`{t.name}`"
    own = next((c for c in t.columns if c.is_text), None)
    out = []
    for col, ref_t, ref_c in t.foreign_keys:
        other = tables.get(ref_t)
        if other is None or not other.rows:
            continue
        oc = next((c for c in other.columns if c.is_text), None)
        if oc is None:
            continue
        on = f"FROM {tq} AS T1 JOIN `{ref_t}` AS T2 ON T1.`{col}` = T2.`{ref_c}`"
        R, OC = _h(ref_t), _h(oc.name)
        out.append(
            (
                f"Show the {_h(col)} of each of the {T} and the {OC} of its {R}.",
                f"SELECT T1.`{col}`, T2.`{oc.name}` {on}",
            )
        )
        v = _value(other, oc, rng)
        if own is not None and v is not None:
            out.append(
                (
                    f"Find the {_h(own.name)} of the {T} whose {R} has {OC} '{v}'.",
                    f"SELECT T1.`{own.name}` {on} WHERE T2.`{oc.name}` = '{v}'",
                )
            )
    return out


# -- questions across a link ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Path:
    """From entity table `a` (key `key`, answer column `own`) through joins to table `b`, whose text column
    `oc` a question filters on: `a` JOIN `b` where `b` references `a`, or `a` JOIN a link table JOIN `b`."""

    a: Table
    key: str
    own: Column
    b: Table
    oc: Column
    joins: str
    """The FROM clause, `a` aliased T1 and `b` the last alias."""
    alias: str


def _label(t: Table, *keys: str) -> Column | None:
    """The text column a question names `t`'s rows by: a name or title before other text, never a key."""
    skip = {k.lower() for k in keys} | {c.lower() for c, _, _ in t.foreign_keys}
    cols = [c for c in t.columns if c.is_text and c.name.lower() not in skip] if t.rows else []
    return next((c for c in cols if re.search(r"name|title", c.name, re.I)), cols[0] if cols else None)


def _paths(tables: dict[str, Table]) -> list[_Path]:
    """Every way the schema links an entity to a table that references it, directly or through a link."""
    out = []
    for link in tables.values():
        refs = [(col, tables.get(rt), rc) for col, rt, rc in link.foreign_keys]
        for col, a, key in refs:
            own = _label(a, key) if a is not None and link.rows else None
            if a is None or own is None:
                continue
            base = f"FROM `{a.name}` AS T1 JOIN `{link.name}` AS T2 ON T1.`{key}` = T2.`{col}`"
            if (oc := _label(link)) is not None:
                out.append(_Path(a, key, own, link, oc, base, "T2"))
            for col2, b, key2 in refs:
                oc2 = _label(b, key2) if b is not None else None
                if b is None or b is a or col2 == col or oc2 is None:
                    continue
                joins = f"{base} JOIN `{b.name}` AS T3 ON T2.`{col2}` = T3.`{key2}`"
                out.append(_Path(a, key, own, b, oc2, joins, "T3"))
    return out


def _path_questions(tables: dict[str, Table], rng: random.Random) -> list[tuple[str, str]]:
    """Spider's favourite shapes across a link: the entities with a linked row of some value, with linked
    rows of two values (INTERSECT), without one (NOT IN), and the one with the most linked rows. Only
    questions whose answer has rows are kept: an empty answer cannot tell a right query from a wrong one."""
    conn = sqlite3.connect(":memory:")
    load_tables(conn, tables)
    out = []
    for p in _paths(tables):
        linked = _linked_values(conn, p)
        values = sorted({v for vs in linked.values() for v in vs})
        if len(values) < 2:
            continue
        pairs = sorted({(a, b) for vs in linked.values() for a in vs for b in vs if a < b})
        for question, gold, ranks in _path_templates(p, rng.choice(values), rng.choice(pairs) if pairs else None):
            if conn.execute(gold).fetchall() and not (ranks and _tied(conn, p)):
                out.append((question, gold))
    conn.close()
    return out


def _tied(conn: sqlite3.Connection, p: _Path) -> bool:
    """Whether the entities with the most linked rows are several: "the one with the most" has no answer then."""
    top = conn.execute(f"SELECT count(*) {p.joins} GROUP BY T1.`{p.key}` ORDER BY count(*) DESC LIMIT 2").fetchall()
    return len(top) == 2 and top[0][0] == top[1][0]


def _singular(name: str) -> str:
    words = _h(name)
    if words.endswith(("ss", "series", "data", "news")):
        return words
    if words.endswith("ies"):
        return words[:-3] + "y"
    return words[:-1] if words.endswith("s") else words


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _linked_values(conn: sqlite3.Connection, p: _Path) -> dict[object, list[str]]:
    """Per entity, the values of the filter column it links to that a question can quote."""
    out: dict[object, list[str]] = {}
    for key, v in conn.execute(f"SELECT T1.`{p.key}`, {p.alias}.`{p.oc.name}` {p.joins}"):
        if isinstance(v, str) and v and "'" not in v and len(v) <= 40 and v not in out.setdefault(key, []):
            out[key].append(v)
    return out


def _path_templates(p: _Path, v: str, pair: tuple[str, str] | None) -> list[tuple[str, str, bool]]:
    """(question, gold query, whether it asks for the top-ranked entity) for each of Spider's shapes."""
    A, OWN, B, OC = _plural(p.a.name), _h(p.own.name), _a(_singular(p.b.name)), _h(p.oc.name)
    sel, where = f"SELECT DISTINCT T1.`{p.own.name}` {p.joins}", f"WHERE {p.alias}.`{p.oc.name}`"
    inner = f"SELECT T1.`{p.key}` {p.joins} {where} = '{v}'"
    out = [
        (f"Find the {OWN} of the {A} that have {B} whose {OC} is '{v}'.", f"{sel} {where} = '{v}'", False),
        (
            f"Find the {OWN} of the {A} that do not have {B} whose {OC} is '{v}'.",
            f"SELECT `{p.own.name}` FROM `{p.a.name}` WHERE `{p.key}` NOT IN ({inner})",
            False,
        ),
        (
            f"Which of the {A} has the most {_plural(_singular(p.b.name))}? Show its {OWN}.",
            f"SELECT T1.`{p.own.name}` {p.joins} GROUP BY T1.`{p.key}` ORDER BY count(*) DESC LIMIT 1",
            True,
        ),
    ]
    if pair is not None:
        v1, v2 = pair
        out.append(
            (
                f"Find the {OWN} of the {A} that have both {B} whose {OC} is '{v1}' and one whose {OC} is '{v2}'.",
                f"{sel} {where} = '{v1}' INTERSECT {sel} {where} = '{v2}'",
                False,
            )
        )
    return out
