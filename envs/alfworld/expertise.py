"""What ALFWorld's scripted expert knows: how to act at each privilege level, and how to explain an action
from the student's view (its task, its observation with the notes, its history).

A reason is worth imitating when it states the sub-goal the action serves ("I carry the mug to the
microwave"), and it is realizable when everything it names is in the action (which is admissible, so
visible) or in the student's task, observation and history. The templates below use nothing else.
"""

from __future__ import annotations

import re

from leap_dspy.envs.alfworld.notes import read_note, task_lamp, task_object
from leap_dspy.envs.alfworld.notes import scene_places as _scene_of
from leap_dspy.envs.alfworld.policy import (
    APPLIANCE,
    admissible_from,
    first_unvisited,
    scripted_action,
    search_next,
    task_change,
    task_target,
)
from leap_dspy.envs.expertise import Expertise
from leap_dspy.types import PrivilegedState, StudentInputs


class ALFWorldExpertise(Expertise):
    """Below the top level, the scripted policy of `policy.py`; at the top, alfworld's handcoded oracle,
    searching the way the student can while it has not seen what the task needs (`realizable_search`)."""

    levels = (0, 1, 2)

    def __init__(self, realizable_search: bool = True) -> None:
        self.realizable_search = realizable_search
        """While the student has not yet seen what the task needs, where to look next is a guess for the
        student but a certainty for the oracle. Corrections that send it straight to the hidden object cannot
        be learned from its inputs and teach it to wander; with this on, the expert opens what is closed here
        or goes to the next unvisited place of the scene; once the thing is in view or in hand, the oracle
        leads again."""

    def act(self, inputs: StudentInputs, privileged: PrivilegedState, student_action: str) -> str | None:
        task, observation, history = inputs.task, inputs.observation, inputs.history
        oracle = privileged.oracle_action
        if not oracle:
            facts = {k: v for k, v in privileged.sections.items() if isinstance(v, list)}
            return scripted_action(task, observation, privileged.level, facts)
        if self.realizable_search:
            return realizable_search_action(task, observation, history, student_action, oracle)
        return oracle

    def explain(self, inputs: StudentInputs, privileged: PrivilegedState, action: str,
                student_action: str = "") -> str:
        return realizable_reason(inputs.task, inputs.observation, action, inputs.history)

    def unjustified(self, inputs: StudentInputs, privileged: PrivilegedState, action: str) -> str | None:
        """A `go to` while the thing sought is unseen, other than the next place of a sweep, is a guess for the
        student: only the hidden locations justify it."""
        task, observation, history = inputs.task, inputs.observation, inputs.history
        missing, place = sought(task, observation, history), action.removeprefix("go to ")
        if missing and action.startswith("go to ") and place not in (
                sweep_next(observation, history), search_next(task, observation)):
            return f"goes to {place} while no {missing} has been seen"
        return super().unjustified(inputs, privileged, action)


# visible) or in the student's task, observation and history. The templates below use nothing else.

def holding(history: str, observation: str) -> str | None:
    """What the student visibly picked up and has not put down since, if its inputs show it."""
    noted = read_note(observation, "Holding")
    if noted is not None:
        return None if noted == "nothing" else noted.split(" (")[0]
    held = None
    for line in (history + "\n" + observation).splitlines():
        if line.startswith("Earlier: "):  # actions only, oldest first
            for action in line.removeprefix("Earlier: ").split("; "):
                taken = re.match(r"take ([a-z]+ \d+) from ", action)
                if taken:
                    held = taken[1]
                elif held and re.match(rf"(?:move|put) {re.escape(held)} ", action):
                    held = None
            continue
        picked = re.search(r"You pick up the ([a-z]+ \d+)", line)
        if picked:
            held = picked[1]
        if held and re.search(rf"You (?:move|put) the {re.escape(held)}", line):
            held = None
    return held


def _visited(history: str, observation: str) -> set[str]:
    places = set(re.findall(r"go to ([a-z]+ \d+)", history))
    here = re.match(r"You arrive at ([a-z]+ \d+)", observation)
    if here:
        places.add(here[1])
    return places


def scene_places(observation: str, history: str) -> list[str]:
    """The places the episode's first scene lists, in its order ("you see a cabinet 2, a cabinet 1, ...")."""
    start = next((line for line in history.splitlines() if line.startswith("Start: ")), observation)
    return _scene_of(start)


def current_place(observation: str, history: str) -> str | None:
    """Where the student last arrived, as its inputs show it."""
    noted = read_note(observation, "At")
    if noted is not None:
        return None if noted == "start" else noted
    here = re.match(r"You arrive at ([a-z]+ \d+)", observation)
    if here:
        return here[1]
    for line in reversed(history.splitlines()):
        if line.startswith("Start: "):
            continue
        went = re.findall(r"go to ([a-z]+ \d+)", line)
        if went:
            return went[-1]
    return None


def sweep_next(observation: str, history: str) -> str | None:
    """The next place to search: the first not yet visited after the current one, in the scene's order.

    A rule a small student can follow from two things in its prompt, the scene line and where it stands,
    instead of from its whole history: the step after "countertop 1" in the scene's list is found by
    looking up "countertop 1" there and reading on.
    """
    if read_note(observation, "Unvisited") is not None:  # the notes keep the scene's order, less the places been to
        return first_unvisited(observation)
    admissible = set(admissible_from(observation))
    places = scene_places(observation, history)
    visited = _visited(history, observation)
    current = current_place(observation, history)
    order = places[places.index(current) + 1 :] + places[: places.index(current)] if current in places else places
    return next((p for p in order if p not in visited and f"go to {p}" in admissible), None)


def wrong_object(task: str, observation: str, history: str) -> str | None:
    """What the student holds that is not what the task is about (a candle, when it needs a cloth), if anything."""
    goal, held = task_object(task), holding(history, observation)
    if goal is None or held is None or held.rsplit(" ", 1)[0] == goal:
        return None
    return held


def sought(task: str, observation: str, history: str) -> str | None:
    """What the student is looking for and has not seen yet (the task's object, or, holding it on a look-at
    task, the lamp), or None when nothing is missing from its view."""
    goal = task_object(task)
    if goal is None:
        return None
    held = holding(history, observation)
    if held:
        lamp = re.search(r"\b(desklamp|floorlamp)\b", task.lower())
        if not lamp or not held.startswith(goal):
            return None
        goal = lamp[1]
    return None if _goal_in_view(goal, task, observation, history) else goal


def realizable_search_action(task: str, observation: str, history: str, student_action: str, oracle: str) -> str:
    """The oracle's action, unless it is a `go to` that only the oracle's knowledge of hidden locations can
    justify (see `OracleExpert.realizable_search`); then a search step the student could have chosen."""
    wrong = wrong_object(task, observation, history)
    if wrong:
        # The oracle would carry a wrongly taken object back where it was; putting it down here, where
        # the student can, costs one step and teaches no trip with the wrong thing in hand.
        here = current_place(observation, history)
        put_down = f"move {wrong} to {here}"
        return put_down if here and put_down in admissible_from(observation) else oracle
    # Closing what it searched and looking around are the oracle's habits, not steps a search needs.
    if not (oracle.startswith(("go to ", "close ")) or oracle == "look"):
        return oracle
    if sought(task, observation, history) is None:
        if oracle.startswith("close ") or oracle == "look":
            # Nothing the task needs is behind it: with the student's notes, the policy that plays from
            # them knows the step that does serve the task (carry, treat, place), without the detour.
            return scripted_action(task, observation, 0) or oracle
        return _toward_seen(task, observation, history, oracle)
    here = re.match(r"You arrive at ([a-z]+ \d+)\. The \1 is closed\.", observation)
    if here and f"open {here[1]}" in admissible_from(observation):
        return f"open {here[1]}"
    place = sweep_next(observation, history)
    return f"go to {place}" if place else oracle


def _toward_seen(task: str, observation: str, history: str, oracle: str) -> str:
    """The oracle's `go to`, unless the student's notes say it saw what it needs elsewhere: then the first
    place the notes name (the oracle may head for another instance it knows of, which the student cannot)."""
    goal, seen = task_object(task), read_note(observation, "Seen")
    if not goal or not seen or not oracle.startswith("go to ") or holding(history, observation):
        return oracle
    places = re.findall(rf"\b{re.escape(goal)} \d+ at ([a-z]+ \d+)", seen)
    if not places or oracle.removeprefix("go to ") in places:
        return oracle
    return f"go to {places[0]}" if f"go to {places[0]}" in admissible_from(observation) else oracle


def _goal_in_view(goal: str, task: str, observation: str, history: str) -> bool:
    """Whether the student has seen an instance of `goal` that it has not already put somewhere.

    Only what the environment said counts: the student's own actions (the `Earlier:` line, the part of a
    history line before " -> ") can name things it never saw, such as a guessed "take cloth from sinkbasin 1".
    """
    seen = read_note(observation, "Seen")
    if seen is not None:
        return bool(re.search(rf"\b{re.escape(goal)} \d+ at ", seen))
    said = [observation.replace(task, "")]
    for line in history.replace(task, "").splitlines():
        if " -> " in line and not line.startswith(("Start: ", "Earlier: ")):
            said.append(line.split(" -> ", 1)[1])
    text = "\n".join(said)
    placed = set(re.findall(rf"(?:move|put)(?: the)? ({re.escape(goal)} \d+) ", text))
    return any(instance not in placed for instance in re.findall(rf"\b({re.escape(goal)}(?: \d+)?)\b", text))


def _noted_reason(action: str, need: str | None, seen: str, observation: str, history: str) -> str | None:
    """Copy-then-decide, for a student with notes: a search step's reason first copies what it needs and the
    notes' `Seen:` line, then decides ("Need mug, seen mug 2 at shelf 1: here, I take it"). The token that
    decides between searching on, going back and taking comes right after the copied fact it depends on,
    which a 135M model follows far better than a fact twenty lines up."""
    lamp = re.match(r"^use (?P<x>(?:desklamp|floorlamp) \d+)$", action)
    if lamp:
        return f"Need {lamp['x'].rsplit(' ', 1)[0]}, seen {seen}: here, I turn it on."
    if need is None:
        return None
    head = f"Need {need}, seen {seen}:"
    m = re.match(r"^take (?P<obj>.+) from (?P<x>.+)$", action)
    if m:
        return f"{head} here, I take the {m['obj']}."
    m = re.match(r"^open (?P<x>.+)$", action)
    if m:
        return f"{head} the {m['x']} is closed, I open it."
    m = re.match(r"^go to (?P<x>.+)$", action)
    if m and re.search(rf"\bat {re.escape(m['x'])}\b", seen):
        return f"{head} I go to the {m['x']}."
    if m and m["x"] == sweep_next(observation, history):
        return f"{head} the first unvisited is the {m['x']}."
    if m:
        return f"{head} I check the {m['x']}."
    return None


def _carry_reason(task: str, action: str, held: str | None, observation: str) -> str | None:
    """Copy-then-decide while carrying: where to go is in the task, so the reason copies the task's word for
    it first ("The task says shelf: I go to the shelf 1"). To treat the object,
    the word is the state the task wants and the reason names the appliance that gives it."""
    m = re.match(r"^go to (?P<x>.+)$", action)
    if not m or not held:
        return None
    holding = read_note(observation, "Holding") or held
    place_kind = m["x"].rsplit(" ", 1)[0].replace(" ", "")
    change = task_change(task)
    if change and f"({change}" not in holding and f" {change})" not in holding and place_kind == APPLIANCE[change]:
        return f"The task wants it {change}: the {m['x']} does that, I go there."
    target = task_target(task)
    if target and place_kind == target:
        return f"The task says {target}: I go to the {m['x']}."
    return None


def realizable_reason(task: str, observation: str, action: str, history: str = "") -> str:
    """A one-sentence reason for `action` that names only what the student can see (see `_reason`).

    With notes, the reason first copies the `Holding:` line: whether the student is still looking for
    the object or already carries it is the first decision of every step, and the token that makes it then
    follows the copied fact instead of a line several rows up in the prompt."""
    reason = _reason(task, observation, action, history)
    holding = read_note(observation, "Holding")
    return reason if holding is None else f"Holding {holding}. {reason}"


def _reason(task: str, observation: str, action: str, history: str = "") -> str:
    """A one-sentence reason for `action` that names only what the student can see.

    The student writes the reason before the action, so the reason is where it decides. While it looks for
    something, the reason first copies what it needs from the task ("Need box:"), and only then commits to
    taking it ("here is the box 1"), opening a closed place, or moving on; the two facts the decision
    compares are then next to each other in its own output, which a small model can compare. Other kinds of
    step open with their own word ("Carrying", "Placing", "Heating", ...), committing at once.
    """
    text = action.strip()
    goal = task_object(task) or "thing the task needs"
    held = holding(history, observation)
    wrong = wrong_object(task, observation, history)
    put_down = _wrong_object_reason(text, wrong, goal) if wrong else None
    if put_down:
        return put_down
    missing = sought(task, observation, history)
    need = missing or (goal if not held else None)
    seen = read_note(observation, "Seen")
    if seen is not None:
        lamp = task_lamp(task)
        if held and lamp and held.rsplit(" ", 1)[0] == goal:
            need = lamp  # the object is in hand; the lamp is what it looks for now, as its notes' Seen line
        noted = _noted_reason(text, need, seen, observation, history) or _carry_reason(task, text, held, observation)
        if noted:
            return noted
    m = re.match(r"^go to (?P<x>.+)$", text)
    if m and need:
        return _search_reason(m["x"], need, missing, observation, history)
    if m:
        return f"Carrying the {held} to the {m['x']}."
    return _step_reason(text, need, held, goal)


def _wrong_object_reason(text: str, wrong: str, goal: str) -> str | None:
    """Why the student does something with the wrong thing in hand: it is not what the task needs."""
    if re.match(rf"^(?:move|put) {re.escape(wrong)} ", text):
        return f"The {wrong} is not a {goal}: I put it down here."
    if text.startswith("go to "):
        return f"The {wrong} is not a {goal}: I take it to the {text.removeprefix('go to ')}."
    return None


def _search_reason(place: str, need: str, missing: str | None, observation: str, history: str) -> str:
    """Why it goes to `place` while it needs something: it saw one there, or the sweep comes to it next."""
    if missing is None:
        return f"Need {need}: I saw one at the {place}."
    if place == sweep_next(observation, history):
        if read_note(observation, "Unvisited") is not None:
            return f"Need {need}: not seen yet, the first unvisited is the {place}."
        current = current_place(observation, history)
        if current is None:
            return f"Need {need}: I start with the {place}."
        return f"Need {need}: none here, after the {current} comes the {place}."
    return f"Need {need}: I check the {place}."


def _step_reason(text: str, need: str | None, held: str | None, goal: str) -> str:
    """Why it takes any other step: one template per verb, with the thing it needs or the thing it carries."""
    m = re.match(r"^take (?P<obj>.+) from (?P<x>.+)$", text)
    if m:
        return f"Need {goal}: here is the {m['obj']}, I take it."
    m = re.match(r"^open (?P<x>.+)$", text)
    if m and need:
        return f"Need {need}: the {m['x']} is closed, I open it."
    m = re.match(r"^(?:move|put) (?P<obj>.+?) (?:to|in/on|in|on) (?P<x>.+)$", text)
    if m:
        return f"Placing the {m['obj']} in the {m['x']} as the task asks."
    m = re.match(r"^(?P<verb>heat|cool|clean) (?P<obj>.+) with (?P<x>.+)$", text)
    if m:
        gerund = {"heat": "Heating", "cool": "Cooling", "clean": "Cleaning"}[m["verb"]]
        return f"{gerund} the {m['obj']} with the {m['x']}, as the task asks."
    m = re.match(r"^open (?P<x>.+)$", text)
    if m:
        return f"Opening the closed {m['x']} to look inside."
    m = re.match(r"^close (?P<x>.+)$", text)
    if m:
        return f"Closing the {m['x']}."
    m = re.match(r"^use (?P<x>.+)$", text)
    if m:
        return f"Turning on the {m['x']} to look at the {held or goal} in its light."
    if text == "look":
        return "Looking around the room first."
    if text == "inventory":
        return "Checking what I carry."
    return f"I {text}, the next step the task needs."
