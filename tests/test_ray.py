"""Environments in Ray actors (`--ray local`): episodes stepped in worker processes play exactly as in this
process, and a compile runs with every episode's environment in an actor."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from leap_dspy.programs import OracleExpert, Student  # noqa: E402
from leap_dspy.programs.student import run_episode  # noqa: E402
from leap_dspy.remote import RayEpisodes  # noqa: E402
from leap_dspy.teleprompt import LEAP  # noqa: E402
from leap_dspy.train import TrainConfig  # noqa: E402
from leap_dspy.types import StudentInputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.keybox import KeyBox  # noqa: E402

TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 2, "max_steps": 8}


@pytest.fixture(scope="module")
def local_ray():
    before = os.getcwd()
    os.chdir(ROOT)  # the actors import `examples.keybox` from the working directory, as this process does
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()
    os.chdir(before)


def expert_play(env, task) -> list[tuple[str, str]]:
    expertise, student = KeyBox(**TINY).expertise(), Student()

    def act(inputs: StudentInputs) -> tuple[str, str, None]:
        privileged = env.privileged_state(1)
        privileged.oracle_action = env.oracle_action()
        action = expertise.act(inputs, privileged, "")
        return expertise.explain(inputs, privileged, action), action, None

    trajectory = run_episode(act, student.inputs, env, task)
    return [(s.action, s.next_observation) for s in trajectory.steps] + [("success", str(trajectory.success))]


def test_an_episode_in_an_actor_plays_as_it_does_here(local_ray: None) -> None:
    env = KeyBox(**TINY)
    pool = RayEpisodes(env, workers=2)
    for task in env.tasks("train") + env.tasks("unseen"):
        remote = pool.clone()
        try:
            assert expert_play(remote, task) == expert_play(env.clone(), task)
        finally:
            remote.close()
    assert pool._made <= 2  # actors are reused, never more than `workers`


def test_a_compile_steps_its_environments_in_actors(local_ray: None, tiny_model: str, tmp_path: Path) -> None:
    env = KeyBox(**TINY)
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "run", num_threads=4, progress=False,
                lm_kwargs={"max_new_tokens": 16}, evaluate_base=False, ray="auto", ray_workers=3, train_launcher="",
                train_config=TrainConfig(max_length=512, per_device_batch_size=8, gradient_accumulation=1,
                                         progress_bar=False))
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    assert (tmp_path / "run" / "iter_1" / "metrics.json").exists()
    assert 1 <= leap.placement._ray_episodes._made <= 3
    expert = leap.run.metric_rows()[0]
    assert expert["iteration"] == "expert" and expert["unseen_success"] == 1.0  # played in actors, it still wins


def test_a_dead_actor_is_replaced_and_an_environment_error_keeps_its_type(local_ray: None) -> None:
    """A worker killed mid-episode (OOM, a lost node) costs a replay on a fresh actor, not that episode and every
    later one lent the dead actor; the environment's own exception arrives as itself, not as Ray's report."""
    from tests.data_env import JammedBox

    env = KeyBox(**TINY)
    pool, task = RayEpisodes(env, workers=1), env.tasks("train")[0]
    here, there = env.clone(), pool.clone()
    assert there.reset(task).text == here.reset(task).text
    first, second = (f"shake {box} box" for box in here.boxes[:2])
    assert there.step(first).text == here.step(first).text
    ray.kill(there.actor, no_restart=True)
    assert there.step(second).text == here.step(second).text  # the episode replayed on a fresh actor
    ray.kill(there.actor, no_restart=True)
    there.close()  # dead after its episode: a fresh actor goes back to the pool
    again = pool.clone()
    assert again.reset(task).text == here.reset(task).text
    again.close()
    jammed = RayEpisodes(JammedBox(**TINY), workers=1).clone()
    jammed.reset(task)
    with pytest.raises(RuntimeError, match="^the lid is jammed$"):
        jammed.step(first)


def test_an_environment_defined_in_the_script_is_refused_for_ray_before_anything_runs(tmp_path: Path) -> None:
    """Ray's workers import the environment by its module; one defined in the script being run (`__main__`)
    failed in the first episode's reset, as if the environment were broken."""

    class MainBox(KeyBox):
        pass

    MainBox.__module__ = "__main__"
    with pytest.raises(ValueError, match="MainBox is defined in the script being run"):
        LEAP(MainBox(**TINY), run_dir=tmp_path / "run", ray="local")
