"""ALFWorld: household tasks in text (textworld + alfworld's PDDL domain), generated offline or official."""

from __future__ import annotations

from leap_dspy.envs.alfworld.env import ALFWorld
from leap_dspy.envs.alfworld.generate import TASK_TYPES
from leap_dspy.envs.alfworld.tasks import ALFWorldTask

__all__ = ["TASK_TYPES", "ALFWorld", "ALFWorldTask"]
