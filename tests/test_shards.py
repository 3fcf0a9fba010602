"""A stage's evaluation split across processes (`episode_processes`): each episode is logged once, wherever it
played, and a worker that fails leaves its share to the compile, which says so."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from leap_dspy.envs import env_spec
from leap_dspy.lm import local_lm
from leap_dspy.lm.engine import without_lms
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import Episodes, play_episodes, rollout, student_policy
from leap_dspy.shards import Shards
from leap_dspy.store import JsonlLog
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig
from leap_dspy.types import Split, Task, Trajectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.keybox import KeyBox  # noqa: E402

SMALL = {"num_boxes": 3, "num_train": 8, "num_seen": 3, "num_unseen": 6, "max_steps": 8}


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["task"]["id"] for line in path.read_text().splitlines()]


def test_a_stage_plays_across_processes_and_logs_every_episode_once(tiny_model: str, tmp_path: Path) -> None:
    env, run = KeyBox(**SMALL), tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a thread for each process
    try:
        leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, num_threads=8, progress=False,
                    train_config=TrainConfig(max_length=512, progress_bar=False), lm_kwargs={"max_new_tokens": 16},
                    evaluate_base=False, evaluate_expert=False, evaluate_beside_training=False, episode_processes=2)
        leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                     valset=env.tasks("seen") + env.tasks("unseen"))
    finally:
        torch.set_num_threads(threads)
    valset = sorted(t.id for t in env.tasks("seen") + env.tasks("unseen"))
    for k in (0, 1):  # both evaluations (none beside a fine-tune here) played half their episodes in a worker
        assert sorted(_ids(run / f"iter_{k}" / "eval.jsonl")) == valset
        assert (run / f"iter_{k}" / "shard-1.log").exists()
        metrics = json.loads((run / f"iter_{k}" / "metrics.json").read_text())
        assert metrics["seen_episodes"] == 3 and metrics["unseen_episodes"] == 6
    # rollouts stay in this process: their episodes become training rows, which batches of other sizes would move
    assert sorted(_ids(run / "iter_1" / "trajectories.jsonl")) == sorted(t.id for t in env.tasks("train"))


def test_a_failed_worker_costs_time_not_episodes(tiny_model: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A worker that cannot start (here: an adapter that is not there) leaves its share to this process, which
    says so naming the worker's log; every episode is still played and logged once."""
    env = KeyBox(**SMALL)
    tasks = env.tasks("unseen")
    student = Student()
    student.set_lm(local_lm(tiny_model, max_new_tokens=16))
    engine = {"model": tiny_model, "adapter": str(tmp_path / "no-adapter"), "max_new_tokens": 16}
    shards = Shards(processes=2, threads=1, own_threads=1, env_spec=env_spec(env), env_config=env.config(),
                    engine=engine, settings={}, state=without_lms(student.dump_state()), play={"policy": "student"},
                    folder=tmp_path)
    log = JsonlLog(tmp_path / "eval.jsonl", Trajectory, key=lambda t: t.task.id)
    done = play_episodes(Episodes(log, tasks, "evaluate", student_policy(student)), env, program=student,
                         num_threads=4, progress=False, shards=shards)
    assert sorted(done) == sorted(t.id for t in tasks) == sorted(_ids(log.path))  # each once
    said = " ".join(capsys.readouterr().err.split())
    assert "an episode worker exited 1 after 0 of its 3 episodes" in said and "shard-1.log" in said
    assert "no-adapter" in said and "its 3 episodes play here" in said


class BoxTask(Task):
    """A task class of an environment's own, with typed fields (as ALFWorld's), not extras."""

    boxes: list[str]
    key_box: str


class TypedKeyBox(KeyBox):
    def tasks(self, split: Split) -> list[Task]:
        return [BoxTask(**task.model_dump()) for task in super().tasks(split)]


class _Subclass(Student):
    """A student of the user's own: a worker, which builds leap-dspy's `Student`, could not play as it."""


def test_a_script_rollout_splits_across_processes(tiny_model: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout(..., processes=2)` (what `leap-dspy evaluate` and `rollout` call): every other episode arrives
    from a worker (through its reader thread), all come back in task order with the tasks as given (of the
    environment's own class, which a worker's JSON line does not carry), and a worker's log goes once it
    succeeded."""
    env = TypedKeyBox(**SMALL)
    tasks = env.tasks("unseen")
    student = Student()
    student.set_lm(local_lm(tiny_model, max_new_tokens=16))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    threads, arrived = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        episodes = rollout(student, env, tasks, num_threads=4, processes=2, snap=False,
                           on_trajectory=lambda _: arrived.append(threading.current_thread().name))
        own = _Subclass()
        own.set_lm(student.get_lm())
        assert Shards.of(own, env, 2, {}, tmp_path) is None
        assert Shards.of(student, env, 2, {}, tmp_path) is not None
    finally:
        torch.set_num_threads(threads)
    assert [t.task.id for t in episodes] == [t.id for t in tasks]
    assert all(type(t.task) is BoxTask for t in episodes)
    assert len(arrived) == len(tasks) and sum("_read" in name for name in arrived) == len(tasks[1::2])
    assert not list(tmp_path.glob("leap-dspy-episodes-*"))


def test_a_callback_that_raises_stops_a_split_rollout(tiny_model: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What the caller's callback raises for a worker's episode reaches the caller, and the worker is not left
    blocked on a pipe nobody reads."""
    env = KeyBox(**SMALL)
    student = Student()
    student.set_lm(local_lm(tiny_model, max_new_tokens=16))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def refuse(trajectory: Trajectory) -> None:
        if "_read" in threading.current_thread().name:
            raise OSError("disk full")

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(OSError, match="disk full"):
            rollout(student, env, env.tasks("unseen"), num_threads=4, processes=2, on_trajectory=refuse)
    finally:
        torch.set_num_threads(threads)
    assert not list(tmp_path.glob("leap-dspy-episodes-*"))
