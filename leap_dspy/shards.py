"""A stage's episodes split across processes, each playing its share with its own environment, program and engine.

On a CPU the engine computes little more at two threads than at one, and one interpreter's lock serialises the
episodes' Python (DSPy's formatting and parsing, the environment), so where nothing runs beside the student's
engine a second process is what a second core is worth (docs/performance.md). A worker reads its share and how to
play it from stdin and writes each episode as a JSON line as it ends; a compile logs each on arrival, so a
stop keeps every finished episode and a resume plays only the rest. A worker that fails (it cannot rebuild the
environment, memory runs out) costs time, not episodes: the caller plays what it left, and says so.

Usage (by `play_sharded`, for a compile's stage or `rollout(..., processes=N)`, not by hand):
python -m leap_dspy.shards < plan.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leap_dspy.types import Task, Trajectory

PARENT = "LEAP_DSPY_SHARD_PARENT"  # the pid of the process that started a worker, which it ends with
KINDS = ("episode", "replay")  # a line's first field: an episode, or a near miss played again


@dataclass
class Shards:
    """How a job's episodes may be split: `processes` in all (this one included), each worker on `threads`
    threads, acting as `state` (a `Student`'s saved program, built from `settings`) on an engine of the
    settings `engine` (`LocalEngine.dump_state`); `play` (and `replay`, for a near miss) are `student_policy`'s
    settings."""

    processes: int
    threads: int
    own_threads: int  # this process's
    env_spec: str
    env_config: dict[str, Any]
    engine: dict[str, Any]
    settings: dict[str, Any]
    state: dict[str, Any]
    play: dict[str, Any]
    folder: Path  # where each worker's log goes
    replay: dict[str, Any] | None = None

    @classmethod
    def of(cls, student: Any, env: Any, processes: int | None, play: dict[str, Any], folder: Path,
           replay: dict[str, Any] | None = None) -> Shards | None:
        """`student`'s episodes in `env` split across `processes` (at most one a thread; None: 2 where
        `idle_bf16_cores`, whose engine gains little from a second thread, else 1), or None where a worker
        could not rebuild them: the student is a subclass or formats its prompts otherwise, it acts through
        anything but one local engine (a server pool, an API), or the environment's class cannot be imported
        (defined in `__main__` or inside a function)."""
        import torch

        from leap_dspy.adapters import CompactChatAdapter
        from leap_dspy.cores import idle_bf16_cores
        from leap_dspy.envs import env_spec
        from leap_dspy.lm.engine import LocalEngine, without_lms
        from leap_dspy.programs import Student
        from leap_dspy.rollout import program_engines

        total = torch.get_num_threads()
        processes = min(processes or (2 if idle_bf16_cores() else 1), total)
        engines = program_engines(student) if type(student) is Student else []
        spec = env_spec(env)
        if (processes < 2 or len(engines) != 1 or type(engines[0]) is not LocalEngine
                or type(student.adapter) is not CompactChatAdapter or spec.startswith("__main__:")
                or "<locals>" in spec or not _as_local_lm_builds(student, engines[0])):
            return None
        threads = max(1, total // processes)
        return cls(processes=processes, threads=threads, own_threads=max(1, total - threads * (processes - 1)),
                   env_spec=spec, env_config=env.config(), engine=engines[0].dump_state(),
                   settings=Student.init_args(student.settings()), state=without_lms(student.dump_state()), play=play,
                   replay=replay, folder=folder)

    def plan(self, tasks: list[Task], replayed: set[str], num_threads: int) -> dict[str, Any]:
        mine = {k: v for k, v in asdict(self).items() if k != "folder"}  # the worker's log is opened here
        return {**mine, "tasks": [t.model_dump(mode="json") for t in tasks], "replayed": sorted(replayed),
                "num_threads": num_threads}


def _as_local_lm_builds(student: Any, engine: Any) -> bool:
    """Whether the student's LM asks what `local_lm` would (greedy, the engine's answer length): a worker
    rebuilds it so, and a script's own sampling settings would play otherwise there."""
    lms = [p.lm for p in student.predictors() if p.lm is not None]
    return all(lm.kwargs.get("temperature") == 0.0 and lm.kwargs.get("max_tokens") == engine.max_new_tokens
               for lm in lms)


class Worker:
    """One worker process playing `tasks`; `on_episode(kind, trajectory)` is called from a reader thread as each
    line arrives ("episode", or "replay" for a near miss played again)."""

    def __init__(self, shards: Shards, index: int, tasks: list[Task], replayed: set[str], num_threads: int,
                 on_episode: Callable[[str, Trajectory], None]) -> None:
        self.log, self.tasks, self.arrived = shards.folder / f"shard-{index}.log", tasks, set[str]()
        self.error: BaseException | None = None  # what `on_episode` raised, which `finish` raises
        shards.folder.mkdir(parents=True, exist_ok=True)
        self._given = {task.id: task for task in tasks}  # an episode is logged with the task as given
        environ = {**os.environ, "OMP_NUM_THREADS": str(shards.threads), PARENT: str(os.getpid()),
                   "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "leap_dspy.shards"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, env=environ)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(shards.plan(tasks, replayed, num_threads)).encode())
        self.process.stdin.close()
        self.reader = threading.Thread(target=self._read, args=(on_episode,), daemon=True)
        self.reader.start()

    def _read(self, on_episode: Callable[[str, Trajectory], None]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            kind, _, body = line.decode(errors="replace").partition("\t")
            try:
                trajectory = Trajectory.model_validate_json(body) if kind in KINDS else None
            except ValueError:  # cut short by a stop: the episode plays again
                trajectory = None
            if trajectory is not None and trajectory.task.id in self._given and self.error is None:
                trajectory.task = self._given[trajectory.task.id]
                try:
                    on_episode(kind, trajectory)
                except BaseException as exc:  # kept for `finish`; reading on, so that the worker never blocks
                    self.error = exc
                    continue
                if kind == "episode":
                    self.arrived.add(trajectory.task.id)

    def finish(self) -> str | None:
        """Wait for the worker; None if it played its whole share, else what went wrong (its log's last line).
        Raises what the caller's `on_episode` raised (a log that cannot be written, a callback's error)."""
        code = self.process.wait()
        self.reader.join()
        if self.error is not None:
            raise self.error
        if code == 0 and not self.unfinished():
            return None
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return (f"an episode worker {'exited ' + str(code) if code else 'ended'} after {len(self.arrived)} of its "
                f"{len(self.tasks)} episodes ({self.log}" + (f": {lines[-1][:300]})" if lines else ")"))

    def unfinished(self) -> list[Task]:
        return [task for task in self.tasks if task.id not in self.arrived]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()


def _end_with_parent() -> None:
    """The worker gets SIGTERM if the compile dies (on Linux): no orphan keeps playing for a run folder."""
    parent = int(os.environ.get(PARENT, "0"))
    if not sys.platform.startswith("linux") or not parent:
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the compile died before the line above
        sys.exit("the compile that started this episode worker is gone")


def main() -> None:
    """A worker: play the plan's tasks and write each episode (and each near miss played again) to stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _end_with_parent()
    plan = json.loads(sys.stdin.read())
    # The episodes go to the compile on the original stdout; whatever a library prints goes to the log.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch

    from leap_dspy.envs import env_class
    from leap_dspy.lm import local_lm
    from leap_dspy.programs import Student
    from leap_dspy.programs.student import has_near_miss
    from leap_dspy.rollout import run_parallel, student_policy

    torch.set_num_threads(plan["threads"])
    env = env_class(plan["env_spec"])(**plan["env_config"])
    student = Student(**plan["settings"])
    student.load_state(plan["state"])
    student.set_lm(local_lm(**plan["engine"]))
    play = student_policy(student, **plan["play"])
    replay = student_policy(student, **plan["replay"]) if plan["replay"] is not None else None
    replayed, lock = set(plan["replayed"]), threading.Lock()

    def emit(kind: str, trajectory: Trajectory) -> None:
        with lock:
            out.write(f"{kind}\t{trajectory.model_dump_json()}\n")
            out.flush()

    def one(episode_env: Any, task: Task) -> Trajectory:
        trajectory = play(episode_env, task)
        emit("episode", trajectory)
        if replay is not None and task.id not in replayed and has_near_miss(trajectory):
            emit("replay", replay(episode_env, task))
        return trajectory

    tasks = [Task.model_validate(t) for t in plan["tasks"]]
    run_parallel(one, env, tasks, num_threads=plan["num_threads"], program=student)


if __name__ == "__main__":
    main()
