"""Running many episodes at once.

Each episode gets its own environment (`env.clone()`) and its own thread; the local LM engine gathers the
threads' concurrent requests into one batched `generate` call. The runner tells the engine how many
episodes are still playing (`engine.expected`), so a batch starts as soon as every live episode has asked,
instead of waiting on a timer: the environments step in lockstep and the model sees full batches.
"""

from __future__ import annotations

import contextvars
import dataclasses
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import dspy
from dspy.utils.exceptions import AdapterParseError
from rich.markup import escape

from leap_dspy.envs.base import TextEnv
from leap_dspy.metrics import call_usage
from leap_dspy.programs.experts import ATTEMPT, expert_inputs
from leap_dspy.programs.student import Student, capture_privileged, has_near_miss, run_episode
from leap_dspy.progress import console, progress_bar, quiet_repeated_warnings
from leap_dspy.store import JsonlLog
from leap_dspy.types import ExpertUsage, PrivilegedState, StudentInputs, Task, Trajectory

if TYPE_CHECKING:
    from leap_dspy.shards import Shards

Progress = Callable[[Trajectory], None]
ROLLOUT_MAX_STUCK = 2
"""A rollout ends once the student has repeated an action that changed nothing this many times in a row:
greedy decoding rarely leaves such a loop, and each further repeat would only add a copy of the same
correction to the round's data."""
quiet_repeated_warnings()


def engine_counters(program: dspy.Module | None) -> dict[str, float]:
    """What the local engines behind `program` have done so far: seconds generating and answers remembered
    (see `LocalEngine.answer_cache`); a stage's difference of two readings splits its time by kind of work."""
    engines = [e for e in program_engines(program) if hasattr(e, "generate_seconds")]
    seconds = {id(e.hf_model): e.generate_seconds for e in engines}  # engines of one model share a generator
    return {"generate_s": sum(seconds.values()), "remembered": sum(e.remembered for e in engines)}


def program_engines(program: dspy.Module | None) -> list[Any]:
    """The batching engines behind a program's LMs (those that accept an `expected` hint)."""
    lms = []
    if program is not None and hasattr(program, "predictors"):  # a scripted expert may be a plain function
        lms = [p.lm for p in program.predictors() if getattr(p, "lm", None) is not None]
    if not lms and dspy.settings.lm is not None:
        lms = [dspy.settings.lm]
    engines = []
    for lm in lms:
        engine = getattr(lm, "engine", None) or getattr(lm, "_engine", None)
        if engine is not None and hasattr(engine, "expected") and engine not in engines:
            engines.append(engine)
    return engines


class _Live:
    """Counts one job's live episodes; each engine's `expected` is the sum over the jobs playing through it, so
    that two jobs at once (two rollouts from a script's threads) fill its batches together rather than each
    leaving the other's requests to wait out the batcher's timer."""

    _jobs: ClassVar[dict[int, list[_Live]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, engines: list[Any], total: int, threads: int) -> None:
        self.engines, self.pending, self.threads = engines, total, threads
        with self._lock:
            for engine in engines:
                self._jobs.setdefault(id(engine), []).append(self)
            self._publish()

    def _publish(self) -> None:
        for engine in self.engines:
            jobs = self._jobs.get(id(engine))
            engine.expected = max(1, sum(min(j.pending, j.threads) for j in jobs)) if jobs else None

    def done(self) -> None:
        with self._lock:
            self.pending -= 1
            self._publish()

    def close(self) -> None:
        with self._lock:
            for engine in self.engines:
                jobs = self._jobs.get(id(engine), [])
                if self in jobs:
                    jobs.remove(self)
                if not jobs:
                    self._jobs.pop(id(engine), None)
            self._publish()


def run_parallel(play: Callable[[TextEnv, Task], Trajectory], env: TextEnv, tasks: Iterable[Task], *,
                 num_threads: int = 32, program: dspy.Module | None = None,
                 on_trajectory: Progress | None = None) -> list[Trajectory]:
    """Play every task, each in a fresh clone of `env`, `num_threads` at a time; results in task order."""
    tasks = list(tasks)
    if not tasks:
        return []
    threads = max(1, min(num_threads, len(tasks)))
    live = _Live(program_engines(program), len(tasks), threads)
    results: list[Trajectory | None] = [None] * len(tasks)

    def one(i: int, task: Task) -> tuple[int, Trajectory]:
        episode_env = env.clone()
        try:
            return i, play(episode_env, task)
        finally:
            episode_env.close()
            live.done()

    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="episode") as pool:
            futures = [pool.submit(contextvars.copy_context().run, one, i, t) for i, t in enumerate(tasks)]
            for future in as_completed(futures):
                i, trajectory = future.result()
                results[i] = trajectory
                if on_trajectory is not None:
                    on_trajectory(trajectory)
    finally:
        live.close()
    return [r for r in results if r is not None]


@dataclasses.dataclass
class Replays:
    """Episodes that had a near miss (`has_near_miss`), played once more as their first play ends, each in the
    thread (and so the batches) that played it: a stage's snapped replays fill the strict evaluation's shrinking
    batches instead of a tail of their own. A worker process (`leap_dspy.shards`) replays by the same rule."""

    log: JsonlLog[Trajectory]
    play: Callable[[TextEnv, Task], Trajectory]


@dataclasses.dataclass
class Episodes:
    """A resumable batch of episodes: the tasks, how one is played, and the log each lands in as it ends."""

    log: JsonlLog[Trajectory]
    tasks: list[Task]
    label: str
    play: Callable[[TextEnv, Task], Trajectory]
    replays: Replays | None = None


def play_episodes(job: Episodes, env: TextEnv, *, program: dspy.Module | None, num_threads: int,
                  progress: bool = True, shards: Shards | None = None) -> dict[str, Trajectory]:
    """The one episode runner of a compile: plays the tasks not yet in the job's log, appends each episode as it
    ends (the resume point) and returns all of them by task id. An episode's replay (`job.replays`) lands in
    its own log; one cut short by a stop is played again by the next `play_episodes` over that log. With
    `shards`, worker processes play part of the tasks (see `leap_dspy.shards`)."""
    done = job.log.load()
    todo = [task for task in job.tasks if task.id not in done]
    if not todo:
        return done
    replayed = job.replays.log.load() if job.replays else {}
    with progress_bar(job.label, len(todo), progress) as advance:
        lock = threading.Lock()

        def arrived(kind: str, trajectory: Trajectory) -> None:
            with lock:
                if kind == "episode":
                    job.log.append(trajectory)
                    done[trajectory.task.id] = trajectory
                    advance()
                elif job.replays is not None:
                    job.replays.log.append(trajectory)

        def play(episode_env: TextEnv, task: Task) -> Trajectory:
            trajectory = job.play(episode_env, task)
            arrived("episode", trajectory)
            again = job.replays
            if again is not None and task.id not in replayed and has_near_miss(trajectory):
                # `reset` starts the episode anew in the same environment (the `TextEnv` contract).
                again.log.append(again.play(episode_env, task))
            return trajectory

        if shards is None or len(todo) < 2 * shards.processes:
            run_parallel(play, env, todo, num_threads=num_threads, program=program)
        else:
            play_sharded(shards, todo, play, arrived, env, num_threads, program, replayed=set(replayed))
    return done


def play_sharded(shards: Shards, todo: list[Task], play: Callable[[TextEnv, Task], Trajectory],
                 arrived: Callable[[str, Trajectory], None], env: TextEnv, num_threads: int,
                 program: dspy.Module | None, replayed: set[str] | None = None) -> list[Path]:
    """Every `processes`-th task here with `play` (which reports its own episodes), on this process's share of
    the cores; the rest in worker processes, each episode passed to `arrived` as it ends, and here, after,
    whatever a failed worker left. Returns the failed workers' logs."""
    from leap_dspy.cores import generation_threads
    from leap_dspy.shards import Worker

    n = shards.processes
    workers: list[Worker] = []
    try:
        workers = [Worker(shards, i, todo[i::n], replayed or set(), num_threads, arrived) for i in range(1, n)]
        with generation_threads(shards.own_threads):
            run_parallel(play, env, todo[0::n], num_threads=num_threads, program=program)
        failed = [(worker, why) for worker in workers if (why := worker.finish())]
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    for worker, why in failed:
        console.print(f"[yellow]warning:[/yellow] {escape(why)}; its {len(worker.unfinished())} episodes play here",
                      soft_wrap=True, highlight=False)
    left = [task for worker, _ in failed for task in worker.unfinished()]
    if left:
        run_parallel(play, env, left, num_threads=num_threads, program=program)
    return [worker.log for worker, _ in failed]


def student_policy(student: Student, *, capture_level: int | None = None, capture_oracle: bool = False,
                   policy: str = "student", max_steps: int | None = None, snap: bool | None = None,
                   max_stuck: int = 0) -> Callable[[TextEnv, Task], Trajectory]:
    """The student plays; each step records what the expert will read there (see `run_episode`). `snap`
    overrides the student's own `snap_actions` (evaluation is strict, whatever the student does deployed);
    `max_stuck` ends an episode that repeats an action that changes nothing (rollouts, never evaluation)."""

    def play(episode_env: TextEnv, task: Task) -> Trajectory:
        return student.run(episode_env, task, max_steps=max_steps, capture_level=capture_level,
                           capture_oracle=capture_oracle, policy=policy, snap=snap, max_stuck=max_stuck)

    return play


def rollout(student: Student, env: TextEnv, tasks: Iterable[Task], *, num_threads: int = 32,
            capture_level: int | None = None, capture_oracle: bool = False, policy: str = "student",
            max_steps: int | None = None, on_trajectory: Progress | None = None, snap: bool | None = None,
            processes: int | None = 1) -> list[Trajectory]:
    """The student plays each task, in task order (for scripts; a compile's runs go through `play_episodes`).
    With `processes` other than 1 (None: `Shards.of`'s default), worker processes play a share each where
    `Shards.of` can rebuild the student and the environment there (see `leap_dspy.shards`); each worker's log
    is kept only if it failed."""
    from leap_dspy.shards import Shards

    settings = {"capture_level": capture_level, "capture_oracle": capture_oracle, "policy": policy,
                "max_steps": max_steps, "snap": snap}
    play, tasks = student_policy(student, **settings), list(tasks)
    folder = Path(tempfile.gettempdir()) / f"leap-dspy-episodes-{uuid.uuid4().hex[:12]}"  # made by a worker
    distinct = len({task.id for task in tasks}) == len(tasks)  # the workers' episodes are matched by task id
    shards = Shards.of(student, env, processes, settings, folder) if processes != 1 and distinct else None
    if shards is None or len(tasks) < 2 * shards.processes:
        return run_parallel(play, env, tasks, num_threads=num_threads, program=student, on_trajectory=on_trajectory)
    done: dict[str, Trajectory] = {}
    lock = threading.Lock()

    def arrived(_: str, trajectory: Trajectory) -> None:
        with lock:
            done[trajectory.task.id] = trajectory
            if on_trajectory is not None:
                on_trajectory(trajectory)

    def here(episode_env: TextEnv, task: Task) -> Trajectory:
        trajectory = play(episode_env, task)
        arrived("episode", trajectory)
        return trajectory

    failed: list[Path] = []
    try:
        failed = play_sharded(shards, tasks, here, arrived, env, num_threads, student)
    finally:
        if not failed:  # a failed worker's log stays for its warning to name
            shutil.rmtree(folder, ignore_errors=True)
    return [done[task.id] for task in tasks]


class ExpertUnavailable(RuntimeError):
    """The expert gave no answer at all (an HTTP error, a timeout, a refused key) after every attempt, while
    playing: the episode is not logged, so a resume plays it again once the expert answers."""


_UNREACHABLE = {"LMServerError", "LMRateLimitError", "LMTimeoutError", "LMAuthError", "LMBillingError",
                "LMTransportError", "APIConnectionError", "Timeout", "RateLimitError", "ServiceUnavailableError",
                "InternalServerError", "AuthenticationError", "PermissionDeniedError", "LMNotConfiguredError"}
"""DSPy's and LiteLLM's names for an endpoint that is down, slow, out of quota, refusing the key or given none."""


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it was raised from, in turn (DSPy wraps what an engine or LiteLLM raised), stopping at a
    cycle."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error_names(exc: BaseException | None) -> set[str]:
    """The class names along an exception's chain: DSPy wraps LiteLLM's errors in its own."""
    return {cls.__name__ for link in exception_chain(exc) for cls in type(link).__mro__}


def expert_failed(exc: BaseException) -> str:
    """An expert call's failure as a record's note: its kind and the start of its message on one line (a parse
    error quotes the model's whole answer, pages of it from a small model)."""
    return f"expert failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def unreachable(exc: BaseException | None) -> bool:
    """Whether an LM expert's call failed for want of an endpoint (connection, timeout, rate limit, 5xx, key),
    which a later resume may not meet, rather than for this request (a context window, an answer that does
    not parse), which would fail again."""
    return bool(_error_names(exc) & _UNREACHABLE)


def retry_wait(attempt: int, exc: BaseException | None) -> float:
    """Seconds before retrying an expert call: exponential from 0.5 s, longer for a rate limit (429)."""
    scale = 4.0 if any("RateLimit" in name for name in _error_names(exc)) else 0.5
    return min(2.0**attempt * scale, 30.0)


class NoAnswer(Exception):
    """The expert's call returned None: a failed attempt, retried like an error."""


def ask_billed(call: Callable[[], Any], retries: int, spent: list[ExpertUsage]) -> Any:
    """`ask_expert(call, retries)`, each attempt's cost (`dspy.track_usage`) added to `spent`, failed attempts
    included; an attempt that returns None raises `NoAnswer`."""
    def attempt() -> Any:
        failed = False
        with dspy.track_usage() as tracker:
            try:
                answer = call()
            except Exception as exc:
                failed = not isinstance(exc, AdapterParseError)  # no answer came back: not a cache hit
                raise
            finally:
                spent.append(call_usage(tracker, failed=failed))
        if answer is None:
            raise NoAnswer("expert gave no answer")
        return answer

    return ask_expert(attempt, retries)


def ask_expert(call: Callable[[], Any], retries: int) -> Any:
    """`call()` with `retries` attempts and backoff, each retry past DSPy's cached answer (`ATTEMPT`)."""
    for attempt in range(retries):
        token = ATTEMPT.set(attempt)
        try:
            return call()
        except Exception as exc:
            if attempt + 1 == retries:
                raise
            time.sleep(retry_wait(attempt, exc))
        finally:
            ATTEMPT.reset(token)
    raise ValueError("retries must be at least 1")


def expert_policy(expert: dspy.Module, student: Student, env: TextEnv, *, level: int, policy: str = "expert",
                  record_level: int | None = None, retries: int = 1, warn: bool = True
                  ) -> Callable[[TextEnv, Task], Trajectory]:
    """The expert acts (demonstrations for behaviour cloning, and the `expert` reference row).

    It sees the student's inputs (formatted by the student program, so demonstrations are training rows as
    they stand) plus the privileged state of the state it is in, which each step keeps for the realizability
    check; `record_level` keeps the privileged state at that level instead, for training a privileged self on
    the demonstrations (see `privileged_self_rows`).
    """
    attach_env(expert, env)
    capture_level, capture_oracle = expert_capture(expert, env, level)
    retries = 1 if getattr(expert, "scripted", False) else retries  # a scripted expert's failure is its answer
    uses_no_lm = needs_oracle(expert)  # as for corrections: an expert reading the oracle is billed nothing

    def play(episode_env: TextEnv, task: Task) -> Trajectory:
        used: list[PrivilegedState] = []
        bills: list[ExpertUsage | None] = []

        def act(inputs: StudentInputs) -> tuple[str, str, str | None]:
            privileged = capture_privileged(episode_env, capture_level, capture_oracle) or PrivilegedState(level=-1)
            used.append(privileged)
            spent: list[ExpertUsage] = []
            try:
                asked = expert_inputs(inputs, "", "", privileged, wants_text(expert))
                out = ask_billed(lambda: expert(**asked), retries, spent)
            except Exception as exc:  # recorded on the step, unless the endpoint is down: then stop, unlogged
                if unreachable(exc):
                    raise ExpertUnavailable(f"the expert gave no answer after {retries} attempt(s) while playing "
                                            f"{task.id} ({expert_failed(exc)})") from exc
                return "", "", expert_failed(exc)
            finally:
                bills.append(None if uses_no_lm else sum(spent, ExpertUsage()))
            return str(out.reason).strip(), str(out.action).strip(), None

        trajectory = run_episode(act, student.inputs, episode_env, task, policy=policy, capture_level=record_level,
                                 end_on_failure=True, warn=warn)
        for step, privileged, bill in zip(trajectory.steps, used, bills, strict=False):
            step.privileged, step.expert_usage = step.privileged or privileged, bill
        return trajectory

    return play


def expert_rollout(expert: dspy.Module, student: Student, env: TextEnv, tasks: Iterable[Task], *, level: int,
                   num_threads: int = 8, policy: str = "expert", record_level: int | None = None,
                   on_trajectory: Progress | None = None) -> list[Trajectory]:
    """The expert plays each task, in task order (see `expert_policy`)."""
    play = expert_policy(expert, student, env, level=level, policy=policy, record_level=record_level)
    return run_parallel(play, env, tasks, num_threads=num_threads, program=expert, on_trajectory=on_trajectory)


def attach_env(expert: dspy.Module, env: TextEnv) -> dspy.Module:
    """Give an expert that uses the environment's expertise (it has `attach`) this environment's."""
    attach = getattr(expert, "attach", None)
    if callable(attach):
        attach(env)
    return expert


def expert_capture(expert: dspy.Module, env: TextEnv, level: int) -> tuple[int | None, bool]:
    """What to record at each step for `expert` at privilege `level`: (the level whose privileged state it
    reads, or None; whether it reads the oracle's next action), from its capability flags.

    A scripted expert is given the oracle only at the environment's top level; below it, and at the top when
    its expertise asks (`Expertise.state_at_top`), it reads the level's typed sections."""
    if getattr(expert, "scripted", False):
        expertise = getattr(expert, "expertise", None)
        if level < max(env.privilege_levels):
            return level, False
        reads_state = getattr(expertise, "state_at_top", False) or reads_privileged_text(expert)
        return (level if reads_state else None), True
    return (level if reads_privileged_text(expert) else None), needs_oracle(expert)


def needs_oracle(expert: dspy.Module) -> bool:
    """Whether `expert` reads the environment's oracle action (the `reads_oracle` flag)."""
    return bool(getattr(expert, "reads_oracle", False))


def reads_privileged_text(expert: dspy.Module) -> bool:
    """LM experts read the privileged state as text; scripted ones do not (the `reads_privileged_text` flag)."""
    return bool(getattr(expert, "reads_privileged_text", not needs_oracle(expert)))


def wants_text(expert: dspy.Module) -> bool:
    """Whether `expert` is handed the privileged state as text: an expert that is not scripted and reads it so."""
    return reads_privileged_text(expert) and not getattr(expert, "scripted", False)


def round_seed(seed: int, k: int) -> int:
    """The seed of round k's rollout samples in a compile seeded `seed` (what a bench replaying a round uses too)."""
    return seed * 7919 + k


def rollout_samples(train: list[Task], size: int | None, seed: int) -> Iterator[list[Task]]:
    """Disjoint seeded samples of `size` training tasks (all of them when unset), the first as a round has
    always drawn it, so that a run resumes and reruns with the same rollouts."""
    if size is None or size >= len(train):
        yield train
        return
    first = random.Random(seed).sample(train, size)
    yield first
    taken = {t.id for t in first}
    rest = [t for t in train if t.id not in taken]
    random.Random(seed + 1).shuffle(rest)
    for start in range(0, len(rest), size):
        yield rest[start:start + size]
