"""The student's view of a state, and the scripted expert's realizable reasons."""

from __future__ import annotations

import dspy
from leap_dspy.envs.base import action_admissible
from leap_dspy.programs import OracleExpert, Student, realizable_reason
from leap_dspy.programs.experts import holding, task_object

from leap_dspy.realizability import unobserved_mentions
from leap_dspy.types import Observation, PrivilegedState, Step, StudentInputs, Task


def step(i: int, action: str, result: str) -> Step:
    return Step(index=i, inputs=StudentInputs(task="t", observation="o", history="h"), action=action,
                next_observation=result)


def test_student_inputs_bound_the_prompt_and_remember_earlier_actions() -> None:
    student = Student(history_window=2, max_observation_chars=60)
    task = Task(id="x", env="alfworld", split="train", instruction="put a mug in shelf.")
    past = [step(0, "go to drawer 1", "You arrive at drawer 1."), step(1, "open drawer 1", "You open it."),
            step(2, "go to shelf 1", "You arrive at shelf 1."), step(3, "go to drawer 1", "You arrive at drawer 1."),
            step(4, "look", "You are in the middle of a room.")]
    repeated = student.inputs(Task(id="y", env="alfworld", split="train", instruction="i"), Observation(text="o"),
                              past[:3] + [step(3, "go to drawer 1", "a"), step(4, "look", "b"), step(5, "look", "c")])
    assert repeated.history.splitlines()[0] == "Earlier: open drawer 1; go to shelf 1; go to drawer 1"  # once each
    observation = Observation(text="You arrive at a place. " * 10, admissible_actions=["look", "inventory"])
    inputs = student.inputs(task, observation, past)
    assert inputs.task == "put a mug in shelf."
    assert inputs.observation.endswith("...\nActions: look, inventory")
    lines = inputs.history.splitlines()
    assert lines[0] == "Earlier: go to drawer 1; open drawer 1; go to shelf 1"  # steps before the window
    assert lines[1:] == ["go to drawer 1 -> You arrive at drawer 1.", "look -> You are in the middle of a room."]
    assert student.inputs(task, observation, []).history == "(none)"


def test_reasons_name_only_what_the_student_can_see() -> None:
    task = "put a clean mug in microwave."
    assert task_object(task) == "mug"
    assert task_object("find two spraybottle and put them in garbagecan.") == "spraybottle"
    assert task_object("look at bowl under the desklamp.") == "bowl"
    history = "take mug 1 from countertop 1 -> You pick up the mug 1 from the countertop 1."
    assert holding(history, "") == "mug 1"
    assert holding(history + "\nmove mug 1 to shelf 1 -> You move the mug 1 to the shelf 1.", "") is None
    cases = {
        ("go to cabinet 2", ""): "Searching for a mug: I check the cabinet 2.",
        ("go to microwave 1", history): "Carrying the mug 1 to the microwave 1.",
        ("clean mug 1 with sinkbasin 1", history): "Cleaning the mug 1 with the sinkbasin 1, as the task asks.",
        ("open cabinet 2", ""): "Opening the closed cabinet 2 to look inside.",
    }
    for (action, hist), expected in cases.items():
        reason = realizable_reason(task, "You arrive at cabinet 2.", action, hist)
        assert reason == expected
        inputs = StudentInputs(task=task, observation=f"You arrive at cabinet 2.\nActions: {action}", history=hist)
        assert unobserved_mentions(reason, inputs) == []


def test_realizability_flags_privileged_mentions() -> None:
    inputs = StudentInputs(task="put a mug in shelf.", observation="You arrive at drawer 1.\nActions: go to shelf 1",
                           history="(none)")
    assert unobserved_mentions("The mug 3 is in cabinet 4, so I go there.", inputs) == ["mug 3", "cabinet 4"]
    assert unobserved_mentions("I go to shelf 1 next.", inputs) == []


def test_oracle_expert_keeps_a_right_step_and_corrects_a_wrong_one() -> None:
    expert = OracleExpert()
    state = PrivilegedState(level=-1, oracle_action="open drawer 1")
    inputs = dict(task="put a mug in shelf.", observation="You arrive at drawer 1. The drawer 1 is closed.",
                  history="(none)")
    same = expert(**inputs, student_reason="It is closed.", student_action="open drawer 1", privileged_state=state)
    assert (same.reason, same.action) == ("It is closed.", "open drawer 1")
    fixed = expert(**inputs, student_reason="x", student_action="go to shelf 1", privileged_state=state)
    assert fixed.action == "open drawer 1" and "drawer 1" in fixed.reason
    assert isinstance(fixed, dspy.Prediction)


def test_admissible_templates() -> None:
    admissible = ["search[<keywords>]", "click[Next >]"]
    assert action_admissible("search[red shoes]", admissible)
    assert action_admissible("click[Next >]", admissible)
    assert not action_admissible("search[]", admissible)
    assert not action_admissible("click[Buy Now]", admissible)
    assert action_admissible("anything", None)
