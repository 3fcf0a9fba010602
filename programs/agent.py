"""`Agent`: a whole episode as one DSPy program, so that DSPy's own evaluators and optimizers can run it.

`dspy.Evaluate` and `dspy.BetterTogether` call a program on an example's inputs and score the prediction
with a metric. For an agent the input is a task and the output is what happened in the environment, so
`Agent.forward(task)` plays an episode with its `Student` and returns the outcome; `task_success` is the
matching metric. LEAP accepts an `Agent` wherever it accepts a `Student`.
"""

from __future__ import annotations

from typing import Any

import dspy

from leap_dspy.envs.base import TextEnv
from leap_dspy.programs.student import Student
from leap_dspy.types import Task


class Agent(dspy.Module):
    def __init__(self, env: TextEnv, student: Student | None = None, max_steps: int | None = None) -> None:
        super().__init__()
        self.env = env
        self.student = student or Student()
        self.max_steps = max_steps

    def forward(self, task: Task) -> dspy.Prediction:
        env = self.env.clone()
        try:
            trajectory = self.student.run(env, task, max_steps=self.max_steps)
        finally:
            env.close()
        return dspy.Prediction(success=trajectory.success, reward=trajectory.reward, trajectory=trajectory)


def task_success(example: Any, prediction: dspy.Prediction, trace: Any = None) -> float:
    """1.0 when the episode reached its goal (a `dspy.Evaluate`/`BetterTogether` metric)."""
    return float(bool(prediction.success))


def task_reward(example: Any, prediction: dspy.Prediction, trace: Any = None) -> float:
    """The episode's final reward (graded in WebShop, 0/1 elsewhere)."""
    return float(prediction.reward)
