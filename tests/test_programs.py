"""The student's view of a state, and the scripted expert's realizable reasons."""

from __future__ import annotations

import dspy

from leap_dspy.envs.alfworld.expertise import (
    ALFWorldExpertise,
    holding,
    realizable_reason,
    realizable_search_action,
    scene_places,
    sought,
    sweep_next,
    task_object,
)
from leap_dspy.envs.base import action_admissible
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.types import Observation, PrivilegedState, Step, StudentInputs, Task


def step(i: int, action: str, result: str, observation: str = "o") -> Step:
    return Step(index=i, inputs=StudentInputs(task="t", observation=observation, history="h"), action=action,
                next_observation=result)


def test_student_inputs_bound_the_prompt_and_remember_earlier_actions() -> None:
    student = Student(history_window=2, max_observation_chars=60)
    task = Task(id="x", env="alfworld", split="train", instruction="put a mug in shelf.")
    scene = "You are in a room. You see a drawer 1 and a shelf 1.\n\nYour task is to: put a mug in it.\nActions: look"
    past = [step(0, "go to drawer 1", "You arrive at drawer 1.", scene), step(1, "open drawer 1", "You open it."),
            step(2, "go to shelf 1", "You arrive at shelf 1."), step(3, "go to drawer 1", "You arrive at drawer 1."),
            step(4, "look", "You are in the middle of a room.")]
    repeated = student.inputs(Task(id="y", env="alfworld", split="train", instruction="i"), Observation(text="o"),
                              past[:3] + [step(3, "go to drawer 1", "a"), step(4, "look", "b"), step(5, "look", "c")])
    assert repeated.history.splitlines()[1] == "Earlier: open drawer 1; go to shelf 1; go to drawer 1"  # once each
    observation = Observation(text="You arrive at a place. " * 10, admissible_actions=["look", "inventory"])
    inputs = student.inputs(task, observation, past)
    assert inputs.task == "put a mug in shelf."
    assert inputs.observation.endswith("...\nActions: look, inventory")
    lines = inputs.history.splitlines()
    assert lines[0] == "Start: You are in a room. You see a drawer 1 and a shelf 1."  # the scene, without the rest
    assert lines[1] == "Earlier: go to drawer 1; open drawer 1; go to shelf 1"  # steps before the window
    assert lines[2:] == ["go to drawer 1 -> You arrive at drawer 1.", "look -> You are in the middle of a room."]
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
        ("go to cabinet 2", ""): "Need mug: I check the cabinet 2.",
        ("take mug 2 from cabinet 2", ""): "Need mug: here is the mug 2, I take it.",
        ("go to microwave 1", history): "Carrying the mug 1 to the microwave 1.",
        ("clean mug 1 with sinkbasin 1", history): "Cleaning the mug 1 with the sinkbasin 1, as the task asks.",
        ("open cabinet 2", ""): "Need mug: the cabinet 2 is closed, I open it.",
        ("open cabinet 2", history): "Opening the closed cabinet 2 to look inside.",
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


def test_the_realizable_search_sweeps_the_scene_from_where_the_student_stands() -> None:
    task = "clean some spatula and put it in countertop."
    history = ("Start: You are in the middle of a room. Looking quickly around you, you see a coffeemachine 1, "
               "a countertop 1, a garbagecan 1, and a sinkbasin 1.\nEarlier: go to coffeemachine 1\n"
               "go to countertop 1 -> You arrive at countertop 1. On the countertop 1, you see a egg 1.")
    here = ("You arrive at countertop 1. On the countertop 1, you see a egg 1.\nActions: examine countertop 1, "
            "go to coffeemachine 1, go to garbagecan 1, go to sinkbasin 1, look, take egg 1 from countertop 1")
    assert scene_places(here, history) == ["coffeemachine 1", "countertop 1", "garbagecan 1", "sinkbasin 1"]
    assert sweep_next(here, history) == "garbagecan 1"
    # The oracle knows the spatula is in the sinkbasin; the student does not, so the correction searches on,
    # and its reason names the two places the rule reads (both in the student's prompt).
    action = realizable_search_action(task, here, history, "go to coffeemachine 1", "go to sinkbasin 1")
    assert action == "go to garbagecan 1"
    reason = realizable_reason(task, here, action, history)
    assert reason == "Need spatula: none here, after the countertop 1 comes the garbagecan 1."
    assert not unobserved_mentions(reason, StudentInputs(task=task, observation=here, history=history))
    # Once the spatula was in view the oracle leads, and the oracle's habits (closing, looking) are skipped.
    seen = history + "\ngo to garbagecan 1 -> You arrive at garbagecan 1. On it, you see a spatula 1."
    assert realizable_search_action(task, here, seen, "look", "go to garbagecan 1") == "go to garbagecan 1"
    assert realizable_search_action(task, here, history, "look", "close countertop 1") == "go to garbagecan 1"
    assert holding("Earlier: take spatula 1 from sinkbasin 1; clean spatula 1 with sinkbasin 1", "") == "spatula 1"
    # A spatula already put away does not count as one in view: the search for the next one is a search.
    placed = history + "\nmove spatula 1 to countertop 1 -> You move the spatula 1 to the countertop 1."
    assert sought(task, here, placed) == "spatula"
    # The student's own guess names a spatula it never saw: that is no sighting.
    guessed = history + "\ntake spatula from countertop 1 -> Nothing happens."
    assert sought(task, "Nothing happens.", guessed) == "spatula"
    # A wrong object in hand is put down where the student stands, not carried back where the oracle took it from.
    wrong = ("Start: You are in the middle of a room. Looking quickly around you, you see a dresser 1, and a "
             "toilet 1.\ntake candle 1 from dresser 1 -> You pick up the candle 1 from the dresser 1.\n"
             "go to toilet 1 -> You arrive at toilet 1. On the toilet 1, you see a spatula 1.")
    at_toilet = ("You arrive at toilet 1. On the toilet 1, you see a spatula 1.\nActions: go to dresser 1, "
                 "move candle 1 to toilet 1")
    action = realizable_search_action(task, at_toilet, wrong, "go to dresser 1", "go to dresser 1")
    assert action == "move candle 1 to toilet 1"
    assert realizable_reason(task, at_toilet, action, wrong) == "The candle 1 is not a spatula: I put it down here."
    # Holding the object of a look-at task, the student searches for the lamp.
    lamp_task = "look at bowl under the desklamp."
    with_bowl = "take bowl 1 from shelf 1 -> You pick up the bowl 1 from the shelf 1."
    assert sought(lamp_task, "You arrive at bed 1. On the bed 1, you see a pillow 1.", with_bowl) == "desklamp"
    assert sought(lamp_task, "You arrive at desk 1. On the desk 1, you see a desklamp 1.", with_bowl) is None


def test_notes_keep_hands_sightings_and_the_unsearched_places() -> None:
    from leap_dspy.envs.alfworld.notes import read_note, transcript_notes

    first = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a fridge 1, "
             "a countertop 1, and a garbagecan 1.\n\nYour task is to: put a cool apple in garbagecan.")
    task = "put a cool apple in garbagecan."
    turns = [("go to cabinet 1", "You arrive at cabinet 1. The cabinet 1 is closed."),
             ("open cabinet 1", "You open the cabinet 1. The cabinet 1 is open. In it, you see a apple 2."),
             ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 1, a mug 1."),
             ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1."),
             ("go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed."),
             ("cool apple 1 with fridge 1", "You cool the apple 1 using the fridge 1."),
             ("go to mars", "Nothing happens.")]
    notes = transcript_notes(task, first, turns)
    # the second apple is not what it looks for while it carries the first
    assert notes.splitlines() == ["At: fridge 1", "Holding: apple 1 (cool)", "Seen: none", "Unvisited: garbagecan 1"]
    placed = transcript_notes(task, first, [*turns, ("go to garbagecan 1", "You arrive at garbagecan 1. On the "
                                                     "garbagecan 1, you see nothing."),
                                            ("move apple 1 to garbagecan 1",
                                             "You move the apple 1 to the garbagecan 1.")])
    assert read_note(placed, "Holding") == "nothing" and read_note(placed, "Unvisited") == "none"
    assert read_note(placed, "Seen") == "apple 2 at cabinet 1"  # once its hands are free, it is again
    lamp = transcript_notes("look at apple under the desklamp.", first, [
        ("go to cabinet 1", "You arrive at cabinet 1. On the cabinet 1, you see a desklamp 1, a apple 1."),
        ("take apple 1 from cabinet 1", "You pick up the apple 1 from the cabinet 1.")])
    assert read_note(lamp, "Seen") == "desklamp 1 at cabinet 1"
    start = transcript_notes(task, first, [])
    assert start.splitlines()[0] == "At: start" and read_note(start, "Seen") == "none"


def test_notes_replace_the_start_and_earlier_lines_and_steer_the_expert() -> None:
    student = Student()
    task = Task(id="x", env="alfworld", split="train", instruction="put a mug in shelf 1.")
    notes = "At: drawer 1\nHolding: nothing\nSeen: none\nUnvisited: shelf 2, shelf 1"
    past = [step(i, "go to drawer 1", "You arrive at drawer 1.", "You see a drawer 1.") for i in range(4)]
    observation = Observation(text="You arrive at drawer 1.", notes=notes,
                              admissible_actions=["go to shelf 1", "go to shelf 2", "look"])
    inputs = student.inputs(task, observation, past)
    assert inputs.observation == "You arrive at drawer 1.\n" + notes + "\nActions: go to shelf 1, go to shelf 2, look"
    assert not any(line.startswith(("Start: ", "Earlier: ")) for line in inputs.history.splitlines())
    assert sweep_next(inputs.observation, inputs.history) == "shelf 2"  # the first unvisited, not the nearest
    assert realizable_reason(inputs.task, inputs.observation, "go to shelf 2", inputs.history) == (
        "Holding nothing. Need mug, seen none: the first unvisited is the shelf 2.")
    seen = inputs.observation.replace("Seen: none", "Seen: mug 3 at shelf 1")
    # the oracle knows of another mug in the shelf 2; the student saw one in the shelf 1 and goes there
    assert realizable_search_action(inputs.task, seen, inputs.history, "look", "go to shelf 2") == "go to shelf 1"
    assert realizable_reason(inputs.task, seen, "go to shelf 1", inputs.history) == (
        "Holding nothing. Need mug, seen mug 3 at shelf 1: I go to the shelf 1.")
    here = seen.replace("At: drawer 1", "At: shelf 1")
    assert realizable_reason(inputs.task, here, "take mug 3 from shelf 1", inputs.history) == (
        "Holding nothing. Need mug, seen mug 3 at shelf 1: here, I take the mug 3.")
    # The oracle's straight line to a hidden mug is a guess from the student's view; the sweep is not.
    expertise, hidden = ALFWorldExpertise(), PrivilegedState(level=3, oracle_action="go to shelf 1")
    assert expertise.unjustified(inputs, hidden, "go to shelf 1") is not None
    assert expertise.unjustified(inputs, hidden, "go to shelf 2") is None
    assert expertise.act(inputs, hidden, "look") == "go to shelf 2"
    assert ALFWorldExpertise(realizable_search=False).act(inputs, hidden, "look") == "go to shelf 1"
    without = Student(show_notes=False).inputs(task, observation, past)
    assert "Holding:" not in without.observation and without.history.startswith("Start: ")


def test_the_scripted_policy_uses_only_what_its_level_grants() -> None:
    from leap_dspy.envs.alfworld.policy import scripted_action, task_change, task_target

    assert task_change("put a hot apple in fridge.") == "hot" and task_change("put some mug on shelf.") is None
    assert task_target("clean some mug and put it in coffeemachine.") == "coffeemachine"
    task = "put a cool apple in garbagecan."
    view = ("You arrive at cabinet 1. The cabinet 1 is closed.\nAt: cabinet 1\nHolding: nothing\nSeen: none\n"
            "Unvisited: fridge 1, garbagecan 1\nActions: go to fridge 1, go to garbagecan 1, open cabinet 1, look")
    facts = {"object locations": ["apple 3 is in/on fridge 1"]}
    assert scripted_action(task, view, 0, facts) == "open cabinet 1"  # level 0 ignores the facts
    assert scripted_action(task, view, 1, facts) == "go to fridge 1"  # level 1 goes where the apple is
    holding = view.replace("Holding: nothing", "Holding: apple 3")
    assert scripted_action(task, holding, 0) == "go to fridge 1"  # nothing to cool it with here
    at_fridge = holding.replace(", look", ", cool apple 3 with fridge 1")
    assert scripted_action(task, at_fridge, 0) == "cool apple 3 with fridge 1"
    cooled = view.replace("Holding: nothing", "Holding: apple 3 (cool)")
    assert scripted_action(task, cooled, 0) == "go to garbagecan 1"
    states = {"states": ["apple 3 is cool"]}
    assert scripted_action(task, view.replace("Holding: nothing", "Holding: apple 3"), 2, states) == (
        "go to garbagecan 1")  # level 2 knows it is cool already
    assert scripted_action(task, "You arrive at cabinet 1.", 0) is None  # no notes, no policy


def test_the_scripted_policy_keeps_one_target_and_searches_again() -> None:
    """Its choices read the notes, never the history window: both pillows go to the same sofa, and with every
    place visited and the object unseen (the student put it down somewhere) it looks again, in numbered order."""
    from leap_dspy.envs.alfworld.expertise import ALFWorldExpertise
    from leap_dspy.envs.alfworld.policy import scripted_action
    from leap_dspy.types import PrivilegedState, StudentInputs

    task = "find two pillow and put them in sofa."
    carrying = ("You pick up the pillow {n} from the armchair 1.\nAt: armchair 1\nHolding: pillow {n}\nSeen: none\n"
                "Unvisited: {unvisited}\nActions: go to shelf 2, go to shelf 1, go to sofa 2, go to sofa 1, look")
    first = carrying.format(n=1, unvisited="shelf 2, shelf 1, sofa 2, sofa 1")
    second = carrying.format(n=2, unvisited="shelf 2, shelf 1, sofa 2")
    assert scripted_action(task, first, 0) == scripted_action(task, second, 0) == "go to sofa 1"

    task = "put a clean cloth in bathtubbasin."
    lost = ("You arrive at towelholder 1. On the towelholder 1, you see nothing.\nAt: towelholder 1\n"
            "Holding: nothing\nSeen: none\nUnvisited: none\nActions: examine towelholder 1, go to bathtubbasin 1, "
            "go to cabinet 2, go to cabinet 1, go to sinkbasin 1, look")
    assert scripted_action(task, lost, 0) == "go to cabinet 1"  # after towelholder 1, past the bathtubbasin
    at_cabinet = lost.replace("towelholder 1", "cabinet 2").replace("go to cabinet 2", "go to towelholder 1")
    assert scripted_action(task, at_cabinet, 0) == "go to sinkbasin 1"
    expertise, level0 = ALFWorldExpertise(), PrivilegedState(level=0)
    inputs = StudentInputs(task=task, observation=lost, history="")
    assert expertise.act(inputs, level0, "go to none") == "go to cabinet 1"
    assert expertise.unjustified(inputs, level0, "go to cabinet 1") is None
    assert expertise.unjustified(inputs, level0, "go to sinkbasin 1") is not None


def test_carrying_reasons_copy_the_task_word_before_the_place() -> None:
    def view(holding: str, seen: str = "none") -> str:
        return (f"You pick up the mug 1 from the shelf 2.\nAt: shelf 2\nHolding: {holding}\nSeen: {seen}\n"
                "Unvisited: none\nActions: go to sinkbasin 1, go to shelf 1, go to desk 1, use desklamp 1")

    task = "clean some mug and put it in shelf."
    assert realizable_reason(task, view("mug 1"), "go to sinkbasin 1") == (
        "Holding mug 1. The task wants it clean: the sinkbasin 1 does that, I go there.")
    assert realizable_reason(task, view("mug 1 (clean)"), "go to shelf 1") == (
        "Holding mug 1 (clean). The task says shelf: I go to the shelf 1.")
    look = "look at mug under the desklamp."
    assert realizable_reason(look, view("mug 1", "desklamp 1 at desk 1"), "go to desk 1") == (
        "Holding mug 1. Need desklamp, seen desklamp 1 at desk 1: I go to the desk 1.")
    assert realizable_reason(look, view("mug 1", "desklamp 1 at shelf 2"), "use desklamp 1") == (
        "Holding mug 1. Need desklamp, seen desklamp 1 at shelf 2: here, I turn it on.")
    for reason in (realizable_reason(task, view("mug 1"), "go to sinkbasin 1"),
                   realizable_reason(look, view("mug 1", "desklamp 1 at desk 1"), "go to desk 1")):
        inputs = StudentInputs(task=task if "clean" in reason else look, observation=view("mug 1"), history="")
        assert not unobserved_mentions(reason, inputs)
