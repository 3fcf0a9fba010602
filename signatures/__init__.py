"""The typed DSPy signatures LEAP is built on.

Docstrings and field descriptions are short on purpose: they are part of every prompt, and on a CPU the
prompt's length is what training and rollouts pay for. The student's current observation comes last, right
before its answer: a small model attends most to what is nearest, and the step's decision (take what is here,
or move on) is read off the observation, not the history.
"""

from __future__ import annotations

import dspy
from pydantic import BaseModel


class StudentStep(dspy.Signature):
    """Act in a text environment to complete the task. Give a short reason, then one action."""

    task: str = dspy.InputField()
    history: str = dspy.InputField(desc="your recent actions and what they did")
    observation: str = dspy.InputField(desc="what you see now, with the actions you can take")
    reason: str = dspy.OutputField(desc="one sentence")
    action: str = dspy.OutputField(desc="exactly one admissible action")


class PrivilegedCorrection(dspy.Signature):
    """You are an expert teacher. You see the student's state, the student's step and privileged facts the
    student cannot see. Write the step the student should have taken: the best next action and a reason
    that uses only what the student can see in its task, observation and history (never mention the
    privileged facts). If the student's step is already right, repeat it."""

    task: str = dspy.InputField()
    observation: str = dspy.InputField(desc="the student's current observation")
    history: str = dspy.InputField(desc="the student's recent actions and what they did")
    student_reason: str = dspy.InputField()
    student_action: str = dspy.InputField()
    privileged_state: str = dspy.InputField(desc="facts only you can see")
    reason: str = dspy.OutputField(desc="one sentence, realizable from the student's own view")
    action: str = dspy.OutputField(desc="exactly one admissible action")


class PrivilegedStep(dspy.Signature):
    """You are an expert. You see the student's state and privileged facts the student cannot see. Write the
    step the student should take now: the best next action and a reason that uses only what the student can see
    in its task, observation and history (never mention the privileged facts)."""

    task: str = dspy.InputField()
    observation: str = dspy.InputField(desc="the student's current observation")
    history: str = dspy.InputField(desc="the student's recent actions and what they did")
    privileged_state: str = dspy.InputField(desc="facts only you can see")
    reason: str = dspy.OutputField(desc="one sentence, realizable from the student's own view")
    action: str = dspy.OutputField(desc="exactly one admissible action")


class StudentTurn(BaseModel):
    """One step of the student's trajectory as the trajectory expert reads it."""

    step: int
    observation: str
    history: str = ""
    student_reason: str = ""
    student_action: str = ""


class StepFix(BaseModel):
    """The expert's corrected reason and action for one step, by its index."""

    step: int
    reason: str
    action: str


class TrajectoryCorrection(dspy.Signature):
    """You are an expert teacher. You see every step of the student's attempt at the task and privileged facts
    the student cannot see. For each step, write the step the student should have taken there: the best next
    action and a reason that uses only what the student could see at that step (never mention the privileged
    facts). Where the student's step is already right, repeat it."""

    task: str = dspy.InputField()
    steps: list[StudentTurn] = dspy.InputField(desc="the student's steps, in order")
    privileged_state: str = dspy.InputField(desc="facts only you can see, as of the first step")
    corrections: list[StepFix] = dspy.OutputField(desc="one per step, same step numbers")


STUDENT_INPUTS: tuple[str, ...] = tuple(StudentStep.input_fields)

__all__ = ["STUDENT_INPUTS", "PrivilegedCorrection", "PrivilegedStep", "StepFix", "StudentStep", "StudentTurn",
           "TrajectoryCorrection"]
