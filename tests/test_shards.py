"""A stage's evaluation split across processes (`episode_processes`): each episode is logged once, wherever it
played, and a worker that fails leaves its share to the compile, which says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from leap_dspy.envs import env_spec
from leap_dspy.lm import local_lm
from leap_dspy.lm.engine import without_lms
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import Episodes, play_episodes, student_policy
from leap_dspy.shards import Shards
from leap_dspy.store import JsonlLog
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig
from leap_dspy.types import Trajectory

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
    shards = Shards(processes=2, threads=1, own_threads=1, env_spec=env_spec(env), env_config=env.config(),
                    model=tiny_model, adapter=str(tmp_path / "no-adapter"), lm={"max_new_tokens": 16}, settings={},
                    state=without_lms(student.dump_state()), play={"policy": "student"}, folder=tmp_path)
    log = JsonlLog(tmp_path / "eval.jsonl", Trajectory, key=lambda t: t.task.id)
    done = play_episodes(Episodes(log, tasks, "evaluate", student_policy(student)), env, program=student,
                         num_threads=4, progress=False, shards=shards)
    assert sorted(done) == sorted(t.id for t in tasks) == sorted(_ids(log.path))  # each once
    said = " ".join(capsys.readouterr().err.split())
    assert "an episode worker exited 1 after 0 of its 3 episodes" in said and "shard-1.log" in said
    assert "no-adapter" in said and "its 3 episodes play here" in said
