"""The realizability check on completions: whatever kind of expert writes a reason that states a privileged
fact the student never saw, the record is flagged, and with `drop_unrealizable` it never becomes a training
row. (That no privileged state reaches a student *prompt* is test_leap's leak test.)"""

from __future__ import annotations

import re
from pathlib import Path

import dspy
import pytest
from dspy.utils import DummyLM

from leap_dspy.corrections import Corrector, collect_corrections
from leap_dspy.envs.alfworld import ALFWorld
from leap_dspy.programs import OracleExpert, PrivilegedExpert, SelfExpert, Student
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import rollout
from leap_dspy.store import JsonlLog
from leap_dspy.training_data import sft_rows
from leap_dspy.types import Correction, PrivilegedState, StudentInputs, Trajectory

LEVEL = 1  # object locations: the facts a leaking reason states


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ALFWorld:
    return ALFWorld(task_types=["pick_and_place_simple"], num_train=2, num_seen=0, num_unseen=0,
                    cache_dir=str(tmp_path_factory.mktemp("alfworld-cache")))


@pytest.fixture(scope="module")
def visited(env: ALFWorld) -> dict[str, Trajectory]:
    """Real states, with the privileged state at level 1 captured, visited by a student that only looks."""
    student = Student()
    student.set_lm(DummyLM([{"reason": "I look around.", "action": "look"}] * 50))
    trajectories = rollout(student, env, env.tasks("train"), capture_level=LEVEL, num_threads=1, max_steps=3)
    return {t.task.id: t for t in trajectories}


def leak(privileged: PrivilegedState) -> str:
    """A reason that states the object's hidden location, as a careless expert would."""
    fact = privileged.sections["object locations"][0]
    return f"Because {fact.replace('is in/on', 'is in')}, I go there."


class LeakingScript(OracleExpert):
    """The scripted expert with a careless explanation."""

    def forward(self, privileged_state: PrivilegedState, **inputs: str) -> dspy.Prediction:
        out = super().forward(privileged_state=privileged_state, **inputs)
        return dspy.Prediction(reason=leak(privileged_state), action=out.action)


def lm_answers(trajectories: dict[str, Trajectory]) -> DummyLM:
    steps = [s for t in trajectories.values() for s in t.steps]
    return DummyLM([{"reason": leak(s.privileged), "action": "look"} for s in steps] * 3)


@pytest.mark.parametrize("kind", ["scripted", "lm", "self"])
def test_a_leaking_reason_is_flagged_and_kept_out_of_training(kind: str, env: ALFWorld,
                                                               visited: dict[str, Trajectory], tmp_path: Path) -> None:
    if kind == "scripted":
        expert = LeakingScript(env.expertise())
    elif kind == "lm":
        expert = PrivilegedExpert(lm_answers(visited))
    else:
        expert, student = SelfExpert(), Student()
        student.set_lm(lm_answers(visited))
        expert.follow(student)
    log = JsonlLog(tmp_path / "corrections.jsonl", Correction, key=lambda c: c.key)
    corrector = Corrector(expert, 1, LEVEL, env.expertise(), retries=1, drop_unrealizable=True)
    records = collect_corrections(corrector, visited, log, threads=1, progress=False)
    assert records and all(c.unobserved for c in records), [(c.reason, c.dropped) for c in records]
    assert all(c.dropped and "not realizable" in c.dropped for c in records)
    usable = [c for c in records if c.dropped is None]
    student = Student()
    rows = sft_rows(student.step.signature, student.adapter, usable)
    locations = {line for s in (st for t in visited.values() for st in t.steps)
                 for line in s.privileged.sections["object locations"]}
    text = str(rows)
    assert not any(re.sub(r" is in/on ", " is in ", fact) in text for fact in locations)


def test_the_check_reads_word_boundaries_and_whole_facts() -> None:
    room = "You are in the middle of a room.\nActions: go to fridge 1, go to cabinet 12, examine apple 1"
    seen = StudentInputs(task="put an apple in fridge.", history="(none)", observation=room)
    hidden = PrivilegedState(level=1, sections={"object locations": ["apple 1 is in/on fridge 1"]})
    assert unobserved_mentions("I check cabinet 1.", seen) == ["cabinet 1"]  # not inside "cabinet 12"
    # Each name is on screen (the Actions line lists every place and thing); the fact that joins them is not.
    assert unobserved_mentions("The apple 1 is in the fridge 1.", seen, hidden) == ["apple 1 is in/on fridge 1"]
    opened = seen.model_copy(update={"history": "open fridge 1 -> You open the fridge 1. In it, you see a apple 1."})
    assert unobserved_mentions("The apple 1 is in the fridge 1.", opened, hidden) == []
    assert unobserved_mentions("Need apple: the fridge 1 is closed, I open it.", seen, hidden) == []
