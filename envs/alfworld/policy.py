"""A scripted ALFWorld policy for the privilege dial's lower levels: the student's view, plus what a level adds.

At the top level the scripted expert follows alfworld's handcoded oracle, which knows everything. Below it,
the expert may only use what its level grants, so it plays this policy instead:

- level 0 (nothing): the student's own observation and notes only: search the places not yet visited in the
  scene's order (all visited, again in numbered order), open what is closed, take what the task needs once it
  is in view, then clean/heat/cool it, carry it to the target, or find the lamp. Every action it takes is
  realizable by construction.
- level 1 (object locations): as level 0, but instead of searching it goes straight to where the privileged
  state says the object (or the lamp) is: faster, and not realizable from the student's view.
- level 2 (locations + states): as level 1; an object that is already clean/hot/cool is not treated again.

The policy reads the student's inputs as the student program formats them (the notes lines `At:`,
`Holding:`, `Seen:`, `Unvisited:` and the `Actions:` list), so it needs the environment's notes. It never
reads the history: the student sees only its last few steps, and a choice that depends on what the window
still shows changes between steps (the two objects of "put two book in shelf" went to different shelves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from leap_dspy.envs.alfworld.notes import read_note, task_lamp, task_object

APPLIANCE = {"clean": "sinkbasin", "hot": "microwave", "cool": "fridge"}
"""Where ALFWorld's objects become clean, hot or cool."""
_VERB = {"clean": "clean", "hot": "heat", "cool": "cool"}


def task_change(task: str) -> str | None:
    """The state the task wants the object in ("put a hot apple in ..." -> "hot"), if any."""
    text = task.lower()
    for word, state in (("clean", "clean"), ("hot", "hot"), ("heat", "hot"), ("cool", "cool")):
        if re.search(rf"\b{word}\b", text):
            return state
    return None


def task_target(task: str) -> str | None:
    """The kind of receptacle the task's object goes to ("... put it in microwave." -> "microwave")."""
    match = re.search(r"\b(?:in|on|into|onto)\s+(?:a |an |the |some )?([a-z]+)\s*\.?\s*$", task.lower().strip())
    return match[1] if match else None


def admissible_from(observation: str) -> list[str]:
    """The admissible actions a student's observation text lists on its `Actions:` line."""
    line = read_note(observation, "Actions")
    return [a.strip() for a in line.split(", ")] if line else []


def _kind(instance: str) -> str:
    return instance.rsplit(" ", 1)[0].replace(" ", "")


def numbered_places(observation: str) -> list[str]:
    """Where the student stands and where it can go, in numbered order (cabinet 1, cabinet 2, ..., drawer 1):
    the same list at every step of an episode, as the `At:` note and the `Actions:` line give it."""
    here = read_note(observation, "At") or ""
    places = re.findall(r"go to ([a-z]+ \d+)", ", ".join(admissible_from(observation)))
    places += [here] if re.fullmatch(r"[a-z]+ \d+", here) and here not in places else []
    return sorted(places, key=lambda p: (_kind(p), int(p.rsplit(" ", 1)[1])))


def first_unvisited(observation: str) -> str | None:
    """The first place of the notes' `Unvisited:` line (the scene's order) that the student can go to."""
    allowed = set(admissible_from(observation))
    return next((p for p in (read_note(observation, "Unvisited") or "").split(", ") if f"go to {p}" in allowed),
                None)


def search_next(task: str, observation: str) -> str | None:
    """The place a search goes next, from the notes: the first unvisited one in the scene's order, or with every
    place visited and the task's object still unseen, the one after here in numbered order, past the target's
    kind (what is there stays): the object may be behind a door never opened, or where the student put it."""
    unvisited = read_note(observation, "Unvisited")
    if unvisited is None:
        return None
    if unvisited != "none":
        return first_unvisited(observation)
    order, here, target = numbered_places(observation), read_note(observation, "At"), task_target(task)
    start = order.index(here) + 1 if here in order else 0
    return next((p for p in order[start:] + order[:start] if _kind(p) != target and p != here), None)


def _seen(observation: str) -> list[tuple[str, str]]:
    seen = read_note(observation, "Seen") or "none"
    return re.findall(r"([a-z]+ \d+) at ([a-z]+ \d+)", seen)


@dataclass
class _View:
    """One step's inputs, parsed once, so that each decision below reads the same facts."""

    task: str
    observation: str
    level: int
    facts: dict[str, list[str]]
    admissible: list[str]
    allowed: set[str]
    here: str | None
    held: str | None
    held_states: list[str]
    goal: str | None
    lamp: str | None
    change: str | None
    target: str | None


def _read_view(task: str, observation: str, level: int, facts: dict[str, list[str]]) -> _View:
    """Read the notes and the task the way the student's prompt shows them."""
    admissible = admissible_from(observation)
    here = read_note(observation, "At")
    holding = read_note(observation, "Holding") or "nothing"
    held = None if holding == "nothing" else holding.split(" (")[0]
    held_states = re.findall(r"\b(clean|hot|cool)\b", holding.split(" (", 1)[1]) if " (" in holding else []
    if level >= 2 and held:  # the states section says whether it is already in the wanted state
        held_states += [word for line in facts.get("states", []) for word in ("clean", "hot", "cool")
                        if line == f"{held} is {word}"]
    return _View(task=task, observation=observation, level=level, facts=facts, admissible=admissible,
                 allowed=set(admissible), here=None if here in (None, "start") else here, held=held,
                 held_states=held_states, goal=task_object(task), lamp=task_lamp(task),
                 change=task_change(task), target=task_target(task))


def _go(view: _View, place: str | None) -> str | None:
    """Going to `place`, when it is one of the admissible actions."""
    return f"go to {place}" if place and f"go to {place}" in view.allowed else None


def _first_of_kind(view: _View, kind: str) -> str | None:
    """The first place of `kind` in numbered order, other than here: the same one at every step."""
    return next((p for p in numbered_places(view.observation) if _kind(p) == kind and p != view.here), None)


def _known_place(view: _View, kind: str) -> str | None:
    """Where the student saw a `kind`, or at level 1+, where the privileged state says one is."""
    target, lamp = view.target, view.lamp
    for instance, place in _seen(view.observation):
        if _kind(instance) == kind and (target is None or _kind(place) != target or kind == lamp):
            return place
    if view.level >= 1:
        for line in view.facts.get("object locations", []):
            m = re.match(r"([a-z]+ \d+) is in/on ([a-z]+ \d+)", line)
            if m and _kind(m[1]) == kind and (target is None or _kind(m[2]) != target or kind == lamp):
                return m[2]
    return None


def _search(view: _View, kind: str) -> str | None:
    """The next step toward a `kind`: go where one is known, open what is closed here, else search on."""
    place = _known_place(view, kind)
    if place and place != view.here:
        return _go(view, place)
    if view.here and f"open {view.here}" in view.allowed:  # closed, and what it holds is not in view yet
        return f"open {view.here}"
    return _go(view, search_next(view.task, view.observation))


def _carry(view: _View, held: str) -> str | None:
    """With the task's object in hand: find and use the lamp, treat the object, or take it to its target."""
    admissible, target, here = view.admissible, view.target, view.here
    if view.lamp:
        use = next((a for a in admissible if a.startswith(f"use {view.lamp} ")), None)
        return use or _search(view, view.lamp)
    if view.change and view.change not in view.held_states:
        verb, appliance = _VERB[view.change], APPLIANCE[view.change]
        act = next((a for a in admissible if a.startswith(f"{verb} {held} with {appliance} ")), None)
        return act or _go(view, _first_of_kind(view, appliance))
    place = next((a for a in admissible if a.startswith(f"move {held} to ") and target
                  and _kind(a.rsplit(" to ", 1)[1]) == target), None)
    if place is None and here and target and _kind(here) == target and f"open {here}" in view.allowed:
        return f"open {here}"  # the target is closed: open it to put the thing in
    return place or _go(view, _first_of_kind(view, target or ""))


def _fetch(view: _View, goal: str) -> str | None:
    """With empty hands: take the task's object when it is in view, else search for it."""
    here, target = view.here, view.target
    if not (here and target and _kind(here) == target):  # what is already at the target stays there
        take = next((a for a in view.admissible if a.startswith(f"take {goal} ")), None)
        if take:
            return take
    return _search(view, goal)


def scripted_action(task: str, observation: str, level: int,
                    facts: dict[str, list[str]] | None = None) -> str | None:
    """The next action of the scripted policy at `level` (0-2), or None when the inputs carry no notes.

    `facts` are the privileged sections the level grants (`PrivilegedState.sections`): "object locations"
    at level 1 and above, "states" at level 2.
    """
    if read_note(observation, "Unvisited") is None:
        return None
    view = _read_view(task, observation, level, facts or {})
    held, goal = view.held, view.goal
    if held and goal and _kind(held) != goal:  # the wrong thing in hand: put it down here
        return next((a for a in view.admissible if a.startswith(f"move {held} to ")), None)
    if held:
        return _carry(view, held)
    if goal:
        return _fetch(view, goal)
    return "look" if "look" in view.allowed else None
