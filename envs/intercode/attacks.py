"""Attacks against the InterCode sandboxes, each with a check that it was contained (used by the tests and by
bench/sandbox.py). Every check looks at the host (canary files, HOME, a listening socket, processes, disk)
and then starts the next episode to see that it is clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from leap_dspy.envs.intercode.bash_env import InterCodeBash
from leap_dspy.envs.intercode.sandbox import _tree_size, _uid_processes
from leap_dspy.envs.intercode.sql_env import InterCodeSQL
from leap_dspy.types import Task


@dataclass
class AttackResult:
    name: str
    command: str
    contained: bool
    detail: str
    wall_s: float


class _Listener:
    """A TCP server on the host's loopback that records whether anything connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.hits += 1
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=2)
        self.sock.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def bash_attacks(port: int) -> list[tuple[str, str]]:
    return [
        ("rm -rf /", "rm -rf --no-preserve-root / 2>/dev/null; rm -rf /* 2>/dev/null; ls /usr/bin | wc -l"),
        (
            "write to $HOME",
            "echo pwned > $HOME/.bashrc; echo pwned > ~/leap_pwned; echo pwned > /root/leap_pwned2; "
            "echo pwned >> /etc/passwd; echo home=$HOME",
        ),
        (
            "curl/nc to the network",
            f"curl -sS -m 3 http://pypi.org/ 2>&1 | head -2; "
            f"timeout 3 bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo CONNECTED; "
            f"(command -v nc >/dev/null && nc -z -w 2 127.0.0.1 {port} && echo NC-CONNECTED); ip -o link 2>&1 | head",
        ),
        ("fork bomb", ":(){ :|:& };:"),
        (
            "yes > file (disk)",
            "yes > /fill0; for i in $(seq 1 200); do head -c 8M /dev/zero > /fill$i; done; yes > /tmp/fill",
        ),
        ("infinite loop", "while :; do :; done"),
        (
            "background process outlives step",
            "(sleep 300 &); nohup sleep 301 >/dev/null 2>&1 & setsid sleep 302 & disown; echo started",
        ),
        ("read /etc/shadow", "cat /etc/shadow; cat /proc/1/root/etc/shadow; ls /etc"),
    ]


@dataclass
class _HostState:
    """What an attack that escaped would change on the host, taken before each attack."""

    home: list[str]
    bashrc: str
    passwd: str
    hits: int

    @classmethod
    def take(cls, home: Path, listener: _Listener) -> _HostState:
        return cls(sorted(os.listdir(home)), _digest(home / ".bashrc"), _digest(Path("/etc/passwd")), listener.hits)


def run_bash_attacks(wall_s: float = 4.0, only: list[str] | None = None) -> list[AttackResult]:
    """Run each bash attack (or those named in `only`) in a fresh episode and check that it was contained."""
    env = InterCodeBash(task_set="bench", limits={"wall_s": wall_s, "cpu_s": 3})
    task = next(t for t in env.tasks("train") + env.tasks("seen") + env.tasks("unseen") if t.id == "bench-0")
    canary_dir = Path(tempfile.mkdtemp(prefix="leap-canary-"))
    canary = canary_dir / "canary.txt"
    canary.write_text("host file\n")
    listener = _Listener()
    results = []
    try:
        for name, cmd in bash_attacks(listener.port):
            if only and name not in only:
                continue
            results.append(_run_bash_attack(env, task, name, cmd, wall_s, canary, listener))
    finally:
        env.close()
        listener.close()
        with contextlib.suppress(OSError):
            canary.unlink()
            canary_dir.rmdir()
    return results


def _run_bash_attack(
    env: InterCodeBash, task: Task, name: str, cmd: str, wall_s: float, canary: Path, listener: _Listener
) -> AttackResult:
    """One attack as one episode step, judged by the host, the episode's leftovers and the next episode."""
    home = Path.home()
    before = _HostState.take(home, listener)
    env.reset(task)
    assert env.box is not None
    quota = env.box.limits.disk_mb * 1024 * 1024
    t0 = time.monotonic()
    obs = env.step(cmd)
    wall = time.monotonic() - t0
    out = obs.text
    problems = _host_problems(home, before, canary, listener, out)
    if "root:" in out and "shadow" in name:
        problems.append("read /etc/shadow")
    if env.box.root_mode and _uid_processes(env.box.uid):
        problems.append("processes left behind")
    if _tree_size(env.box.root) > quota:
        problems.append("episode root over its disk quota")
    if wall > wall_s + 5:
        problems.append(f"step took {wall:.1f}s")
    if not os.path.exists("/usr/bin/env"):
        problems.append("host /usr damaged")
    problems += _next_episode_problems(env, task)
    detail = "; ".join(problems) or _summary(name, out, obs.info)
    return AttackResult(name, cmd, not problems, detail, round(wall, 2))


def _host_problems(home: Path, before: _HostState, canary: Path, listener: _Listener, out: str) -> list[str]:
    """What the attack changed on the host since `before`: the canary, HOME, /etc/passwd, the host network."""
    problems = []
    if canary.read_text() != "host file\n":
        problems.append("host canary changed")
    if sorted(os.listdir(home)) != before.home or _digest(home / ".bashrc") != before.bashrc:
        problems.append("host HOME changed")
    if _digest(Path("/etc/passwd")) != before.passwd:
        problems.append("host /etc/passwd changed")
    if listener.hits != before.hits or "CONNECTED" in out:
        problems.append("reached the host network")
    return problems


def _next_episode_problems(env: InterCodeBash, task: Task) -> list[str]:
    """The next episode must be clean: same files as the task's initial file system, no processes."""
    env.reset(task)
    assert env.box is not None
    problems = []
    if env.box.snapshot() != env.initial:
        problems.append("next episode's file system differs")
    ps = env.step("ps -e -o comm=")
    procs = [p for p in ps.text.split() if p not in ("bwrap", "ps")]
    if procs:
        problems.append(f"next episode sees processes: {procs}")
    return problems


def _summary(name: str, out: str, info: dict) -> str:
    last = [ln for ln in out.strip().splitlines() if ln.strip()]
    tail = last[-1][:90] if last else "(no output)"
    killed = info.get("killed")
    return (f"killed: {killed}; " if killed else "") + f"exit {info.get('exit_code')}; last line: {tail}"


SQL_ATTACKS = [
    ("DROP TABLE", "DROP TABLE student"),
    ("ATTACH", "ATTACH DATABASE '/tmp/leap_attack.db' AS evil"),
    ("write through a CTE", "WITH x AS (SELECT 1) DELETE FROM student"),
    ("INSERT ... SELECT", "INSERT INTO student SELECT * FROM student"),
    ("PRAGMA write", "PRAGMA writable_schema = 1"),
    ("load_extension", "SELECT load_extension('/tmp/evil.so')"),
    ("query that never ends", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"),
    ("huge cross join", "SELECT count(*) FROM student a, student b, student c, student d, student e, student f"),
]


RUNAWAY = {"query that never ends", "huge cross join"}
"""Contained when stopped by the time limit (or, MariaDB's recursive CTE, by max_recursive_iterations)."""


def run_sql_attacks(backend: str = "sqlite", timeout_s: float = 2.0) -> list[AttackResult]:
    env = InterCodeSQL(backend=backend, task_set="bench", timeout_s=timeout_s)
    task = next(t for s in ("train", "seen", "unseen") for t in env.tasks(s) if t.db == "pets_1")
    results = []
    for name, query in SQL_ATTACKS:
        env.reset(task)
        before = env.step("SELECT count(*), sum(age) FROM student").text
        t0 = time.monotonic()
        obs = env.step(query)
        wall = time.monotonic() - t0
        after = env.step("SELECT count(*), sum(age) FROM student").text
        problems = []
        runaway = name in RUNAWAY
        if not runaway and not obs.text.startswith("Error"):
            problems.append(f"accepted: {obs.text[:80]}")
        if after != before:
            problems.append("data changed")
        if wall > timeout_s + 3:
            problems.append(f"took {wall:.1f}s")
        if os.path.exists("/tmp/leap_attack.db"):
            problems.append("attached file created")
            os.unlink("/tmp/leap_attack.db")
        env.reset(task)  # next episode: the oracle still succeeds
        while (a := env.oracle_action()) is not None:
            o = env.step(a)
        if not o.success:
            problems.append("next episode's oracle failed")
        detail = "; ".join(problems) or obs.text.splitlines()[0][:110]
        results.append(AttackResult(name, query, not problems, detail, round(wall, 2)))
    env.close()
    return results
