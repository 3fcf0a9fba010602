"""The student's notes: what an ALFWorld episode has shown so far, kept as four short lines.

A 135M student cannot reliably recall, from a transcript, whether it already holds the object, where it saw
one, or which places it has not searched yet; the decisions that fail (taking again, moving the object
before reaching the target, pacing between two places) all hinge on those facts. `transcript_notes`
keeps them the way a person keeps a shopping list, and the student reads them next to the observation, so the
deciding fact is one short line away from the decision and its reason can copy it.

The notes are a pure function of the task's instruction and the texts the student was shown (the first
observation and each step's command and feedback): nothing here reads the game state, so whatever the notes
say the student has been told. `ALFWorld` computes them from its own transcript and returns them in
`Observation.notes`.
"""

from __future__ import annotations

import re

_TASK_OBJECT = [
    re.compile(r"\b(?:put|find|place) (?:a|an|some|two) (?:clean |hot |cool |heated |cooled )?(?P<obj>[a-z]+)"),
    re.compile(r"\b(?:heat|cool|clean) (?:a|an|some|the) (?P<obj>[a-z]+)"),
    re.compile(r"\b(?:look at|examine) (?:(?:a|an|some|the) )?(?P<obj>[a-z]+)"),
]
_STATE_WORDS = {"clean": "clean", "heat": "hot", "cool": "cool"}
_INSTANCE = r"[a-z]+ \d+"


def task_object(task: str) -> str | None:
    """The kind of object an ALFWorld-style instruction is about ("put a clean mug in ..." -> "mug")."""
    for pattern in _TASK_OBJECT:
        match = pattern.search(task.lower())
        if match:
            return match["obj"]
    return None


def task_lamp(task: str) -> str | None:
    """The lamp a look-at task needs ("examine the pen with the desklamp" -> "desklamp")."""
    match = re.search(r"\b(desklamp|floorlamp)\b", task.lower())
    return match[1] if match else None


def scene_places(first_observation: str) -> list[str]:
    """The places the first observation lists, in its order ("you see a cabinet 2, a cabinet 1, ...")."""
    listed = re.search(r"you see (.+?)\.(?:\s|$)", first_observation)
    if not listed:
        return []
    parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", listed[1])
    return [re.sub(r"^(?:a|an)\s+", "", part.strip()) for part in parts if part.strip()]


def transcript_notes(task: str, first_observation: str, turns: list[tuple[str, str]]) -> str:
    """Four lines from what the student has been shown: where it is, what it holds (and whether it is clean,
    hot or cool), where it saw what it is looking for now (the task's object, or holding it on a look-at task,
    the lamp) and has not moved since, and the places of the first observation it has not been to, in that
    observation's order (the order a search follows).

    `turns` are (command, feedback) pairs in play order; feedback that says nothing happened changes nothing.
    """
    places = scene_places(first_observation)
    wanted = [w for w in (task_object(task), task_lamp(task)) if w]
    visited: list[str] = []
    here: str | None = None
    held: str | None = None
    states: dict[str, list[str]] = {}
    seen: dict[str, str] = {}  # instance -> place, in the order first seen
    placed: set[str] = set()  # put where the task wants them (or anywhere): not to be fetched again
    for _command, feedback in turns:
        text = feedback.strip()
        arrived = re.match(rf"You arrive at ({_INSTANCE})\.", text)
        opened = re.match(rf"You open the ({_INSTANCE})\.", text)
        if arrived:
            here = arrived[1]
            if here not in visited:
                visited.append(here)
        if (arrived or opened) and here:
            for kind in wanted:
                for instance in re.findall(rf"\b({kind} \d+)\b", text.split(".", 1)[-1]):
                    if instance != held and instance not in placed:
                        seen[instance] = here
        picked = re.match(rf"You pick up the ({_INSTANCE}) from the ({_INSTANCE})", text)
        if picked:
            held = picked[1]
            seen.pop(held, None)
        moved = re.match(rf"You (?:move|put) the ({_INSTANCE}) (?:to|in|on|in/on) the ({_INSTANCE})", text)
        if moved and moved[1] == held:
            placed.add(held)
            held = None
        changed = re.match(rf"You (clean|heat|cool) the ({_INSTANCE}) using the ({_INSTANCE})", text)
        if changed and changed[2] == held:
            states.setdefault(held, []).append(_STATE_WORDS[changed[1]])
    holding = f"{held} ({', '.join(states[held])})" if held and states.get(held) else held or "nothing"
    goal, lamp = task_object(task), task_lamp(task)
    # Only what the student looks for now: the task's object, or with it in hand on a look-at task, the lamp.
    # A second apple seen while carrying the first would only invite a detour.
    looking_for = goal if held is None or held.rsplit(" ", 1)[0] != goal else lamp
    seen_text = ", ".join(f"{instance} at {place}" for instance, place in seen.items()
                          if instance.rsplit(" ", 1)[0] == looking_for) or "none"
    unvisited = [p for p in places if p not in visited and p != here]
    return (f"At: {here or 'start'}\nHolding: {holding}\nSeen: {seen_text}\n"
            f"Unvisited: {', '.join(unvisited) if unvisited else 'none'}")


def read_note(text: str, key: str) -> str | None:
    """The value of a `key: value` notes line in a student's observation text, or None when it has none."""
    for line in text.splitlines():
        if line.startswith(f"{key}: "):
            return line.removeprefix(f"{key}: ").strip()
    return None
