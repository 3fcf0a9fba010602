"""DSPy programs: the student agent and the privileged experts that correct it."""

from leap_dspy.programs.agent import Agent, task_reward, task_success
from leap_dspy.programs.experts import (
    MissingPrivilege,
    OracleExpert,
    PrivilegedExpert,
    SelfExpert,
)
from leap_dspy.programs.student import Student, run_episode

__all__ = [
    "Agent",
    "MissingPrivilege",
    "OracleExpert",
    "PrivilegedExpert",
    "SelfExpert",
    "Student",
    "run_episode",
    "task_reward",
    "task_success",
]
