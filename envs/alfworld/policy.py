"""A scripted ALFWorld policy for the privilege dial's lower levels: the student's view, plus what a level adds.

At the top level the scripted expert follows alfworld's handcoded oracle, which knows everything. Below it,
the expert may only use what its level grants, so it plays this policy instead:

- level 0 (nothing): the student's own observation and notes only: search the places not yet visited in the
  scene's order, open what is closed, take what the task needs once it is in view, then clean/heat/cool it,
  carry it to the target, or find the lamp. Every action it takes is realizable by construction.
- level 1 (object locations): as level 0, but instead of searching it goes straight to where the privileged
  state says the object (or the lamp) is: faster, and not realizable from the student's view.
- level 2 (locations + states): as level 1; an object that is already clean/hot/cool is not treated again.

The policy reads the student's inputs as the student program formats them (the notes lines `At:`,
`Holding:`, `Seen:`, `Unvisited:` and the `Actions:` list), so it needs the environment's notes.
"""

from __future__ import annotations

import re

from leap_dspy.envs.alfworld.notes import read_note, scene_places, task_lamp, task_object

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


def _first_of_kind(places: list[str], kind: str) -> str | None:
    return next((p for p in places if _kind(p) == kind), None)


def _seen(observation: str) -> list[tuple[str, str]]:
    seen = read_note(observation, "Seen") or "none"
    return re.findall(r"([a-z]+ \d+) at ([a-z]+ \d+)", seen)


def scripted_action(task: str, observation: str, history: str, level: int,
                    facts: dict[str, list[str]] | None = None) -> str | None:
    """The next action of the scripted policy at `level` (0-2), or None when the inputs carry no notes
    ("look" when it has nothing better: everything searched, nothing found).

    `facts` are the privileged sections the level grants (`PrivilegedState.sections`): "object locations"
    at level 1 and above, "states" at level 2.
    """
    if read_note(observation, "Unvisited") is None:
        return None
    facts = facts or {}
    admissible = admissible_from(observation)
    allowed = set(admissible)
    here = read_note(observation, "At")
    here = None if here in (None, "start") else here
    holding = read_note(observation, "Holding") or "nothing"
    held = None if holding == "nothing" else holding.split(" (")[0]
    held_states = re.findall(r"\b(clean|hot|cool)\b", holding.split(" (", 1)[1]) if " (" in holding else []
    goal, lamp, change, target = task_object(task), task_lamp(task), task_change(task), task_target(task)
    first = next((line.removeprefix("Start: ") for line in history.splitlines() if line.startswith("Start: ")), "")
    places = scene_places(first) or [p for p in (read_note(observation, "Unvisited") or "").split(", ") if p]
    places = places + [p for p in re.findall(r"go to ([a-z]+ \d+)", ", ".join(admissible)) if p not in places]
    if level >= 2 and held:  # the states section says whether it is already in the wanted state
        held_states += [word for line in facts.get("states", []) for word in ("clean", "hot", "cool")
                        if line == f"{held} is {word}"]

    def go(place: str | None) -> str | None:
        return f"go to {place}" if place and f"go to {place}" in allowed else None

    def known_place(kind: str) -> str | None:
        """Where the student saw a `kind`, or at level 1+, where the privileged state says one is."""
        for instance, place in _seen(observation):
            if _kind(instance) == kind and (target is None or _kind(place) != target or kind == lamp):
                return place
        if level >= 1:
            for line in facts.get("object locations", []):
                m = re.match(r"([a-z]+ \d+) is in/on ([a-z]+ \d+)", line)
                if m and _kind(m[1]) == kind and (target is None or _kind(m[2]) != target or kind == lamp):
                    return m[2]
        return None

    def search(kind: str) -> str | None:
        place = known_place(kind)
        if place and place != here:
            return go(place)
        if here and f"open {here}" in allowed:  # closed, and what it holds is not in view yet
            return f"open {here}"
        unvisited = [p for p in (read_note(observation, "Unvisited") or "").split(", ") if p and p != "none"]
        return next((f"go to {p}" for p in unvisited if f"go to {p}" in allowed), None)

    if held and goal and _kind(held) != goal:  # the wrong thing in hand: put it down here
        return next((a for a in admissible if a.startswith(f"move {held} to ")), None)
    if held:
        if lamp:
            use = next((a for a in admissible if a.startswith(f"use {lamp} ")), None)
            return use or search(lamp)
        if change and change not in held_states:
            verb, appliance = _VERB[change], APPLIANCE[change]
            act = next((a for a in admissible if a.startswith(f"{verb} {held} with {appliance} ")), None)
            return act or go(_first_of_kind(places, appliance))
        place = next((a for a in admissible if a.startswith(f"move {held} to ") and target
                      and _kind(a.rsplit(" to ", 1)[1]) == target), None)
        if place is None and here and target and _kind(here) == target and f"open {here}" in allowed:
            return f"open {here}"  # the target is closed: open it to put the thing in
        return place or go(_first_of_kind(places, target or ""))
    if goal:
        if not (here and target and _kind(here) == target):  # what is already at the target stays there
            take = next((a for a in admissible if a.startswith(f"take {goal} ")), None)
            if take:
                return take
        return search(goal)
    return "look" if "look" in allowed else None
