"""InterCode-Bash over the real task sets, each command run in a bubblewrap sandbox (see sandbox.py).

Tasks come from the installed packages (data.py): `intercode-bench`'s 24 benchmark tasks on its `setup_fs.sh`
file system and `icalfa`'s nl2bash task sets (~300 tasks on five file systems). Each task's file system is
built once per process by running the upstream setup script inside a sandbox (its absolute paths land in the
sandbox's private root, so the script runs unmodified); every episode, and every gold evaluation, starts from
a fresh copy of it (mtimes preserved, so time-dependent commands agree between agent and gold).

Action grammar (as upstream): any shell command, run with `bash -c` in the current directory (a bare
`cd DIR` changes it, as upstream tracks `cd`); `submit` ends the episode and computes the reward.
Splits (`task_set`):
- `default`: train/seen = the nl2bash tasks (without those whose question is also a benchmark question) and
  240 tasks generated on 10 file systems (filesystems.py), each source shuffled by `seed` and cut 80/20;
  unseen = the 24 benchmark tasks and 12 generated tasks on each of 3 file systems whose roots no training
  task names: 24 alone would make one episode 4 points, and tell nothing of a new folder tree.
- `shipped`: the nl2bash tasks and the 24 benchmark tasks alone (what `default` was before 2026-12-02).
- `generated`: the generated tasks alone, the same cut.
- `bench`: the 24 benchmark tasks shuffled by `seed`, 12 train / 6 seen / 6 unseen.
- `nl2bash`: the nl2bash tasks shuffled by `seed`, 60/20/20.
`task_file`: your own tasks (`data.task_file`; a task's `setup` names a shipped setup script or your own) replace
the splits they name.
Every set leaves out the tasks that cannot grade a student here (`ungradable`), and a task file is refused if it
has one.
"""

from __future__ import annotations

import atexit
import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from leap_dspy.envs.intercode import data, filesystems
from leap_dspy.envs.intercode.common import SUBMIT, InterCodeEnv, truncate
from leap_dspy.envs.intercode.expertise import BashExpertise
from leap_dspy.envs.intercode.reward import bash_reward, fs_changes
from leap_dspy.envs.intercode.sandbox import (
    RunResult,
    Sandbox,
    SandboxLimits,
    check_bwrap,
    new_uid,
    snapshot_tree,
)
from leap_dspy.types import SPLITS, Observation, PrivilegedState, Split, Task

TASK_SETS = ("default", "shipped", "generated", "bench", "nl2bash")
GEN_TRAIN = range(10)
"""The generated file systems whose tasks train (and, cut 80/20, make the seen split)."""


def gen_unseen(count: int = 3) -> list[int]:
    """Generated file systems for unseen tasks: the first from 100 on whose root no training one has, so
    that no path of theirs was ever in a training task."""
    used = {filesystems.file_system(k).root for k in GEN_TRAIN}
    found: list[int] = []
    k = 100
    while len(found) < count:
        root = filesystems.file_system(k).root
        if root not in used:
            used.add(root)
            found.append(k)
        k += 1
    return found


SUCCESS = 0.995
"""The reward that counts as solving a task (rewards are rounded to hundredths)."""


class SetupFailed(RuntimeError):
    """A setup script exited non-zero or ran out of time: every task on its half-built file system would be
    graded against it."""


class _Templates:
    """One built file system per setup script, shared by all episodes of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.boxes: dict[str, Sandbox] = {}
        self.states: dict[str, dict[str, str]] = {}

    def get(self, setup: str) -> tuple[Path, dict[str, str]]:
        with self.lock:
            if setup not in self.boxes:
                box = Sandbox(SandboxLimits(wall_s=30))
                res = box.run(data.setup_script(setup))
                if res.killed or res.exit_code != 0:
                    box.close()
                    last = (res.output.strip().splitlines() or [""])[-1]
                    raise SetupFailed(f"setup script {setup} failed (exit code {res.exit_code}): {last}")
                self.boxes[setup] = box
                self.states[setup] = snapshot_tree(box.root)
            return self.boxes[setup].root, self.states[setup]


TEMPLATES = _Templates()


def run_gold(gold: str, setup: str, limits: SandboxLimits, uid: int) -> tuple[RunResult, dict[str, str]]:
    """The gold command run on a fresh copy of its setup's file system: its result and the tree it leaves."""
    template, _ = TEMPLATES.get(setup)
    with Sandbox(limits, template=template, uid=uid) as box:
        return box.run(gold, cwd="/"), box.snapshot()


def ungradable(tasks: list[Task], limits: dict[str, Any]) -> dict[str, str]:
    """Why each of `tasks` that cannot grade a student here cannot (by task id): its gold command fails on its
    setup's file system (exits non-zero, prints nothing on stdout and changes no file: a path the setup does not
    make, a program this host lacks) or does not finish, so a student would be graded on reproducing an error;
    or doing nothing earns the gold's full reward (it prints nothing and changes no file the grader sees), so a
    student would be graded on nothing it did."""
    if not tasks:
        return {}
    key = json.dumps(limits, sort_keys=True)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each check is a sandbox's subprocess
        whys = list(pool.map(lambda task: _cannot_grade(task.gold, task.setup, key), tasks))
    return {task.id: why for task, why in zip(tasks, whys, strict=True) if why}


@cache
def _cannot_grade(gold: str, setup: str, limits: str) -> str | None:
    box_limits, (_, initial) = SandboxLimits(**json.loads(limits)), TEMPLATES.get(setup)
    res, final = run_gold(gold, setup, box_limits, new_uid())
    if res.killed:
        return "its gold command does not finish within the sandbox's limits"
    if res.exit_code != 0 and not fs_changes(initial, final):
        quiet, _ = run_gold(f"{{\n{gold}\n}} 2>/dev/null", setup, box_limits, new_uid())
        if not quiet.output.strip():  # `diff` and `grep -c` exit 1 with an answer on stdout
            last = (res.output.strip().splitlines() or [""])[-1][:160]
            return f"its gold command fails here (exit code {res.exit_code}: {last})"
    if bash_reward(initial, initial, final, "", res.output)[0] >= SUCCESS:
        return "doing nothing earns its gold command's full reward (it prints nothing and changes no file)"
    return None


_SAID: set[str] = set()  # what the task lists left out, said once a process


def _leave_out(splits: dict[str, list[Task]], limits: dict[str, Any]) -> dict[str, list[Task]]:
    """The splits without the tasks that cannot grade (`ungradable`), saying how many left each split."""
    from leap_dspy.progress import console

    whys = ungradable([task for tasks in splits.values() for task in tasks], limits)
    if not whys:
        return splits
    counts = ", ".join(f"{sum(t.id in whys for t in tasks)} of {len(tasks)} {split}" for split, tasks in splits.items())
    line = (f"intercode-bash: left out {counts} tasks that cannot grade a student here, e.g. "
            f"{next(iter(whys))}: {next(iter(whys.values()))}")
    if line not in _SAID:
        _SAID.add(line)
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    return {split: [t for t in tasks if t.id not in whys] for split, tasks in splits.items()}


class InterCodeBash(InterCodeEnv):
    name: ClassVar[str] = "intercode-bash"
    privilege_levels: ClassVar[dict[int, str]] = {
        0: "nothing",
        1: "the gold command",
        2: "the gold command, its expected output and the file changes it makes (and nl2bash's alternative gold)",
    }
    default_privilege_level: ClassVar[int] = 1

    def __init__(
        self,
        task_set: str = "default",
        seed: int = 0,
        max_steps: int = 10,
        obs_chars: int = 400,
        limits: dict[str, Any] | None = None,
        num_train: int | None = None,
        num_seen: int | None = None,
        task_file: str | None = None,
    ):
        if task_set not in TASK_SETS:
            raise ValueError(f"task_set must be one of {TASK_SETS}, not {task_set!r}")
        self.task_set = task_set
        self.task_file = str(Path(task_file).expanduser().resolve()) if task_file else None  # runs rebuild it anywhere
        self._file_records = data.task_file(task_file, ()) if task_file else []
        for record in self._file_records:  # your own setup script, found beside the task file
            if "setup" in record and not re.fullmatch(r"[\w-]+:[\w.-]+", record["setup"]):
                script = (Path(task_file).expanduser().parent / record["setup"]).resolve()  # type: ignore[arg-type]
                if not script.is_file():
                    why = "is a folder, not a script" if script.is_dir() else "does not exist"
                    raise ValueError(f"task_file {task_file}: setup script {script} {why}")
                record["setup"] = str(script)
            elif "setup" in record:  # a shipped script: a misspelt name would fail every episode of the task
                try:
                    data.setup_script(record["setup"])
                except (KeyError, ValueError, OSError, data.DataUnavailable):
                    raise ValueError(f"task_file {task_file}: setup {record['setup']} is not a shipped setup script "
                                     "(intercode:setup_fs.sh, icalfa:setup_nl2b_fs_<1-5>.sh, generated:fs-<k>)"
                                     ) from None
        self.seed = seed
        self.limits_kwargs = dict(limits or {})
        mine = self.file_tasks
        try:
            whys = ungradable(mine, self.limits_kwargs)  # your own tasks are refused, not left out
        except SetupFailed as exc:  # your own setup script: named as the file loads, not at its first episode
            raise ValueError(f"task_file {task_file}: {exc}") from None
        first = next((i for i, task in enumerate(mine) if task.id in whys), None)
        if first is not None:
            raise ValueError(f"task_file {task_file}, task {first}: {whys[mine[first].id]}")
        self.num_train, self.num_seen = num_train, num_seen
        self.max_steps = max_steps
        self.obs_chars = obs_chars
        self.limits = SandboxLimits(**self.limits_kwargs)
        self._splits: dict[str, list[Task]] | None = None
        self.task: Task | None = None
        self.box: Sandbox | None = None
        self._gold_cache: dict[str, tuple[str, dict[str, str]]] = {}
        self.uid = new_uid()  # used in root mode only

    def config(self) -> dict[str, Any]:
        return {
            "task_set": self.task_set,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "obs_chars": self.obs_chars,
            "limits": self.limits_kwargs,
            "num_train": self.num_train,
            "num_seen": self.num_seen,
            "task_file": self.task_file,
        }

    # -- tasks -----------------------------------------------------------------------------------------------
    def _file_task(self, record: dict[str, str], index: int, split: Split) -> Task:
        source = f"file-{Path(self.task_file or 'tasks').stem}"  # never a shipped task's id
        rec = data.BashRecord(source, index, record["query"], record["gold"], record.get("gold2"),
                              record.get("setup", "intercode:setup_fs.sh"))
        return self._task(rec, split)

    def _task(self, rec: data.BashRecord, split: Split) -> Task:
        return Task(
            id=f"{rec.source}-{rec.index}",
            env=self.name,
            split=split,
            instruction=rec.query,
            gold=rec.gold,
            gold2=rec.gold2,
            setup=rec.setup,
            source=rec.source,
        )

    def _build_splits(self) -> dict[str, list[Task]]:
        return _leave_out(self._shipped_splits(), self.limits_kwargs)

    def _shipped_splits(self) -> dict[str, list[Task]]:
        rng = random.Random(self.seed)
        bench = list(data.bench_bash())
        if self.task_set == "bench":
            rng.shuffle(bench)
            return self._tasks({"train": bench[:12], "seen": bench[12:18], "unseen": bench[18:]})
        bench_queries = {r.query.strip().lower() for r in bench}
        nl = [r for r in data.nl2bash() if r.query.strip().lower() not in bench_queries]
        rng.shuffle(nl)
        if self.task_set == "nl2bash":
            a, b = int(0.6 * len(nl)), int(0.8 * len(nl))
            return self._tasks({"train": nl[:a], "seen": nl[a:b], "unseen": nl[b:]})
        cut = int(0.8 * len(nl))
        shipped = self._tasks({"train": nl[:cut], "seen": nl[cut:], "unseen": bench})
        if self.task_set == "shipped":
            return shipped
        gen = [t for k in GEN_TRAIN for t in self._generated(k, 24)]
        rng.shuffle(gen)
        cut = int(0.8 * len(gen))
        generated = {"train": gen[:cut], "seen": gen[cut:], "unseen": [t for k in gen_unseen() for t in
                                                                       self._generated(k, 12)]}
        if self.task_set == "generated":
            splits = generated
        else:  # both sources, mixed so that a small run's first tasks hold both
            splits = {s: shipped[s] + generated[s] for s in SPLITS}
            rng.shuffle(splits["train"])
            rng.shuffle(splits["seen"])
        return {s: [t.model_copy(update={"split": s}) for t in ts] for s, ts in splits.items()}

    def _tasks(self, parts: dict[str, list[data.BashRecord]]) -> dict[str, list[Task]]:
        return {s: [self._task(r, s) for r in recs] for s, recs in parts.items()}  # type: ignore[arg-type]

    def _generated(self, k: int, n: int) -> list[Task]:
        return [
            Task(id=f"gen-fs{k}-{i}", env=self.name, split="train", instruction=query, gold=gold,
                 gold2=None, setup=f"{filesystems.PREFIX}fs-{k}", source="generated")
            for i, (query, gold) in enumerate(filesystems.tasks(k, n))
        ]

    # -- episode ---------------------------------------------------------------------------------------------
    def reset(self, task: Task) -> Observation:
        check_bwrap()
        self.close()
        template, initial = TEMPLATES.get(task.setup)
        self.task = task
        self.initial = initial
        self.box = Sandbox(self.limits, template=template, uid=self.uid)
        self.workdir = "/"
        self.last_output = ""
        self.steps = 0
        self.done = False
        self.actions: list[str] = []
        return Observation(text=task.instruction, info={"task_id": task.id, "cwd": self.workdir})

    def step(self, action: str) -> Observation:
        if self.task is None or self.box is None:
            return Observation(text="No episode is running: call reset(task) first.", done=True)
        if self.done:
            return Observation(text="The episode is over.", done=True, reward=self.reward, success=self.success)
        action = (action or "").strip()
        if not action:
            return Observation(text="Empty command: give a shell command, or `submit` to finish.")
        if "\x00" in action:
            return Observation(text="Malformed command: it contains a NUL byte.")
        if action.lower() == SUBMIT:
            return self._finish()
        self.steps += 1
        self.actions.append(action)
        m = re.fullmatch(r"cd(?:\s+(\S+))?", action)
        if m:
            target = _simplify_path(self.workdir, m.group(1) or "/root")
            res = self.box.run(f"cd -- {_q(target)}", cwd="/")
            if res.exit_code == 0:
                self.workdir = target
            output = res.output
        else:
            res = self.box.run(action, cwd=self.workdir)
            output = res.output
        self.last_output = output
        info = {"exit_code": res.exit_code, "cwd": self.workdir, "killed": res.killed, "wall_s": res.wall_s}
        if self.steps >= self.max_steps:
            obs = self._finish()
            obs.text = truncate(output, self.obs_chars) + "\n" + obs.text
            return obs
        return Observation(text=truncate(output, self.obs_chars), info=info)

    def _gold(self) -> tuple[str, dict[str, str]]:
        assert self.task is not None
        key = self.task.id
        if key not in self._gold_cache:
            res, tree = run_gold(self.task.gold, self.task.setup, self.limits, self.uid)
            self._gold_cache[key] = (res.output, tree)
        return self._gold_cache[key]

    def _finish(self) -> Observation:
        assert self.box is not None
        gold_out, gold_fs = self._gold()
        reward, info = bash_reward(self.initial, self.box.snapshot(), gold_fs, self.last_output, gold_out)
        self.done = True
        self.reward = reward
        self.success = reward >= SUCCESS
        text = f"Submitted. Reward {reward:.2f}."
        return Observation(text=text, reward=reward, done=True, success=self.success, info=info)

    # -- expert ----------------------------------------------------------------------------------------------
    def privileged_state(self, level: int) -> PrivilegedState:
        self.check_level(level)
        sections: dict[str, str | list[str]] = {}
        if self.task is None or level == 0:
            return PrivilegedState(level=level, sections=sections)
        sections["gold command"] = self.task.gold
        if level >= 2:
            gold_out, gold_fs = self._gold()
            sections["expected output"] = truncate(gold_out, self.obs_chars) or "(no output)"
            changes = fs_changes(self.initial, gold_fs)
            sections["expected file changes"] = [f"{k} {p}" for p, k in sorted(changes.items())] or ["(none)"]
            if self.task.gold2:
                sections["alternative gold command"] = self.task.gold2
        return PrivilegedState(level=level, sections=sections)

    def expertise(self) -> BashExpertise:
        """Look (`ls`) where the gold command goes before running it (see expertise.py); level 1, the
        default, has a policy of its own."""
        return BashExpertise()

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
            self.box = None


def cleanup_templates() -> None:
    with TEMPLATES.lock:
        for box in TEMPLATES.boxes.values():
            box.close()
        TEMPLATES.boxes.clear()
        TEMPLATES.states.clear()


def _simplify_path(current: str, changed: str) -> str:
    if changed.startswith("/"):
        current = ""
    path: list[str] = []
    for seg in (current + "/" + changed).split("/"):
        if seg == "..":
            if path:
                path.pop()
        elif seg and seg != ".":
            path.append(seg)
    return "/" + "/".join(path)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


atexit.register(cleanup_templates)

__all__ = ["InterCodeBash", "TASK_SETS", "cleanup_templates"]
