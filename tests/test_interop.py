"""LEAP inside DSPy's own machinery: `dspy.Evaluate` over an `Agent`, and `dspy.BetterTogether` using LEAP as
its weight optimizer."""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest
from dspy.teleprompt import BetterTogether

from leap_dspy.envs.alfworld import ALFWorld
from leap_dspy.lm import local_lm
from leap_dspy.programs import Agent, OracleExpert, Student, task_success
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ALFWorld:
    return ALFWorld(num_receptacles=5, task_types=["pick_and_place_simple"], num_train=3, num_seen=1,
                    num_unseen=1, max_steps=6, cache_dir=str(tmp_path_factory.mktemp("alfworld-cache")))


def examples(tasks: list) -> list[dspy.Example]:
    return [dspy.Example(task=t).with_inputs("task") for t in tasks]


def test_dspy_evaluate_runs_an_agent(env: ALFWorld, tiny_model: str) -> None:
    agent = Agent(env, Student())
    agent.set_lm(local_lm(tiny_model, max_new_tokens=8))
    result = dspy.Evaluate(devset=examples(env.tasks("seen") + env.tasks("unseen")), metric=task_success,
                           num_threads=2, display_progress=False)(agent)
    assert result.score == 0.0  # a random tiny model wins nothing; the point is that the loop runs in DSPy
    assert len(result.results) == 2


def test_better_together_uses_leap_as_its_weight_optimizer(env: ALFWorld, tiny_model: str, tmp_path: Path) -> None:
    agent = Agent(env, Student())
    agent.set_lm(local_lm(tiny_model, max_new_tokens=8))
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "run", teacher=OracleExpert(),
                train_config=TrainConfig(max_length=512, gradient_accumulation=1, progress_bar=False),
                train_launcher="", lm_kwargs={"max_new_tokens": 8},
                evaluate_base=False, evaluate_expert=False, progress=False)
    optimizer = BetterTogether(metric=task_success, w=leap)
    compiled = optimizer.compile(agent, trainset=examples(env.tasks("train")), valset=examples(env.tasks("seen")),
                                 strategy="w")
    by_strategy = {c["strategy"]: c["program"] for c in compiled.candidate_programs}
    assert set(by_strategy) == {"", "w"}  # the baseline and LEAP's result, both scored by BetterTogether
    leap_program = by_strategy["w"]
    assert leap_program.student.step.lm.engine.adapter == str((tmp_path / "run" / "iter_1" / "adapter").resolve())
    assert (tmp_path / "run" / "metrics.csv").exists()
