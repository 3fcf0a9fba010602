"""Write your own environment: a key hidden in one of several closed boxes, and a locked door.

The smallest environment with hidden information where what the expert may know matters. The student sees the
boxes but not which one holds the key; shaking a box tells (a key rattles), and opening an empty box springs a
trap that ends the episode. The oracle opens the right box at once, which no student can learn to do (nothing it
sees says which box), while `KeyboxExpertise` shakes the boxes in the order the student sees them and opens the
one that rattled, which it can.

    leap-dspy compile --env examples.keybox:KeyBox --set num_boxes=4
"""

from __future__ import annotations

import random
import re
from typing import Any, ClassVar

from leap_dspy.envs.base import TextEnv
from leap_dspy.envs.expertise import Expertise
from leap_dspy.types import Observation, PrivilegedState, Split, StudentInputs, Task

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange", "brown", "grey")
INSTRUCTION = "find the key, unlock the door and open it. Opening an empty box springs a trap."
RATTLED = re.compile(r"You shake the (\w+ box): a key rattles inside")


class KeyBox(TextEnv):
    """A room with closed boxes, one holding the key, and a locked door.

    Training and seen tasks have 3 to `num_boxes` boxes, unseen ones one or two more (longer searches than any
    demonstration). Six training rooms by default: LEAP's setting, a few demonstrations that behaviour cloning
    alone does not generalize from. `realizable=False` gives the generic expertise, which follows the oracle
    straight to the key.
    """

    name: ClassVar[str] = "keybox"
    privilege_levels: ClassVar[dict[int, str]] = {0: "nothing", 1: "which box holds the key"}
    default_privilege_level: ClassVar[int] = 1
    idle_actions: ClassVar[tuple[str, ...]] = ("look", "inventory")

    def __init__(self, num_boxes: int = 5, num_train: int = 6, num_seen: int = 10, num_unseen: int = 30,
                 max_steps: int | None = None, seed: int = 0, realizable: bool = True) -> None:
        if not 2 <= num_boxes <= len(COLOURS) - 2:
            raise ValueError(f"keybox: num_boxes must be between 2 and {len(COLOURS) - 2}")
        self.num_boxes, self.seed, self.realizable = int(num_boxes), int(seed), bool(realizable)
        self.counts = {"train": int(num_train), "seen": int(num_seen), "unseen": int(num_unseen)}
        # The longest unseen search (shake every box, open, take, unlock, open the door) plus one slip.
        self.max_steps = int(max_steps or self.num_boxes + 2 + 5)
        self.boxes: list[str] = []
        self.key_box, self.shaken, self.opened = "", [], []
        self.has_key, self.unlocked, self.done, self.lost = False, False, True, False

    def config(self) -> dict[str, Any]:
        return {"num_boxes": self.num_boxes, "num_train": self.counts["train"], "num_seen": self.counts["seen"],
                "num_unseen": self.counts["unseen"], "max_steps": self.max_steps, "seed": self.seed,
                "realizable": self.realizable}

    def tasks(self, split: Split) -> list[Task]:
        """Generated from (seed, split) alone, so every clone and every rerun sees the same tasks."""
        rng = random.Random(f"keybox-{self.seed}-{split}")
        low, high = (self.num_boxes + 1, self.num_boxes + 2) if split == "unseen" else (min(3, self.num_boxes),
                                                                                        self.num_boxes)
        tasks = []
        for i in range(self.counts[split]):
            boxes = [f"{colour} box" for colour in rng.sample(COLOURS, rng.randint(low, high))]
            tasks.append(Task(id=f"keybox-{split}-{i}", env=self.name, split=split, instruction=INSTRUCTION,
                              boxes=boxes, key_box=rng.choice(boxes)))
        return tasks

    def reset(self, task: Task) -> Observation:
        self.boxes, self.key_box = list(task.boxes), str(task.key_box)  # type: ignore[attr-defined]
        self.shaken, self.opened = [], []
        self.has_key, self.unlocked, self.done, self.lost = False, False, False, False
        return self._observe(f"You are in a small room with a locked door. Looking around, you see {self._list()}.")

    def step(self, action: str) -> Observation:
        """Apply an action; an impossible one says why and changes nothing."""
        if self.done or self.lost:
            return self._observe("The episode is over.")
        return self._observe(self._apply(" ".join(action.lower().split())))

    def _apply(self, action: str) -> str:
        verb, _, box = action.partition(" ")
        if verb in ("shake", "open") and box in self.boxes:
            return self._handle(verb, box)
        if action == "take key":
            if self.has_key or self.key_box not in self.opened:
                return "You already have the key." if self.has_key else "You see no key here."
            self.has_key = True
            return f"You take the key from the {self.key_box}."
        if action == "unlock door":
            if self.has_key and not self.unlocked:
                self.unlocked = True
                return "You unlock the door with the key."
            return "The door is already unlocked." if self.unlocked else "You have no key."
        if action == "open door":
            self.done = self.unlocked
            return "You open the door and walk out. You won!" if self.done else "The door is locked."
        if action == "look":
            return f"You are in a small room with a {'un' if self.unlocked else ''}locked door. You see {self._list()}."
        if action == "inventory":
            return "You are carrying a key." if self.has_key else "You are carrying nothing."
        return f"Nothing happens: {action!r} is not an action here."

    def _handle(self, verb: str, box: str) -> str:
        """Shake or open a box: shaking tells whether the key is inside, opening an empty box is the trap."""
        if box in self.opened:
            return f"The {box} is already open."
        if verb == "shake":
            self.shaken.append(box)
            inside = "a key rattles inside" if box == self.key_box else "it sounds empty"
            return f"You shake the {box}: {inside}."
        self.opened.append(box)
        if box == self.key_box:
            return f"You open the {box}. In it, you see a key."
        self.lost = True
        return f"You open the {box}. It is empty, and the trap springs: the door jams for good. You lost."

    def _list(self) -> str:
        names = [("an " if b[0] in "aeiou" else "a ") + b + (" (open)" if b in self.opened else "") for b in self.boxes]
        return ", ".join(names[:-1]) + " and " + names[-1]

    def _observe(self, text: str) -> Observation:
        """The text plus the admissible actions: boxes to shake, then to open (only the one that rattled, once
        one has), then what the key allows."""
        over = self.done or self.lost
        # Once the key is heard or seen, no other box is worth touching.
        heard = self.key_box in self.shaken and self.key_box not in self.opened
        closed = [] if over or self.key_box in self.opened else [b for b in self.boxes if b not in self.opened]
        actions = [f"shake {b}" for b in closed if b not in self.shaken] + [f"open {b}" for b in closed]
        actions = [f"open {self.key_box}"] if heard and not over else actions
        actions += ["take key"] if self.key_box in self.opened and not self.has_key else []
        actions += ["unlock door"] if self.has_key and not self.unlocked else []
        actions += ["open door"] if self.unlocked and not over else []
        return Observation(text=text, done=over, success=self.done, reward=float(self.done),
                           admissible_actions=[*actions, "look", "inventory"])

    def privileged_state(self, level: int) -> PrivilegedState:
        self.check_level(level)
        where = "the key is in your hand" if self.has_key else f"the key is in the {self.key_box}"
        return PrivilegedState(level=level, sections={"key location": [where]} if level >= 1 else {})

    def oracle_action(self) -> str | None:
        """Straight to the key: right every time, and not something the student could have chosen."""
        if self.done or self.lost:
            return None
        if not self.has_key:
            return "take key" if self.key_box in self.opened else f"open {self.key_box}"
        return "open door" if self.unlocked else "unlock door"

    def expertise(self) -> Expertise:
        return KeyboxExpertise() if self.realizable else Expertise()


def listed_actions(observation: str) -> list[str]:
    """The admissible actions as the student's prompt shows them (its `Actions:` line)."""
    line = next((line for line in observation.splitlines() if line.startswith("Actions: ")), "")
    return line.removeprefix("Actions: ").split(", ") if line else []


def boxes_to(verb: str, observation: str) -> list[str]:
    """The boxes the student can still shake (or open), in the room's order."""
    return [a.removeprefix(f"{verb} ") for a in listed_actions(observation) if re.fullmatch(rf"{verb} \w+ box", a)]


def rattled(inputs: StudentInputs) -> str | None:
    """The box the student heard rattle and has not opened yet, if any."""
    heard = RATTLED.findall(inputs.history + "\n" + inputs.observation)
    closed = boxes_to("open", inputs.observation)
    return next((box for box in reversed(heard) if box in closed), None)


class KeyboxExpertise(Expertise):
    """The expert a student can imitate: it never reads the privileged state, so it plays the same at every level.

    It shakes the boxes in the order the student's `Actions:` line lists them, opens the one that rattled,
    takes the key, then unlocks and opens the door; its reasons name only what the student's prompt shows.
    """

    levels = (0, 1)

    def act(self, inputs: StudentInputs, privileged: PrivilegedState, student_action: str) -> str | None:
        actions = listed_actions(inputs.observation)
        ready = [a for a in ("take key", "unlock door", "open door") if a in actions]
        box, unshaken = rattled(inputs), boxes_to("shake", inputs.observation)
        return ready[0] if ready else f"open {box}" if box else f"shake {unshaken[0]}" if unshaken else "look"

    def explain(self, inputs: StudentInputs, privileged: PrivilegedState, action: str,
                student_action: str = "") -> str:
        verb, _, box = action.partition(" ")
        if action == "take key":
            return "The box I opened holds the key: I take it."
        if action == "unlock door":
            return "I have the key and the door is locked: I unlock it."
        if action == "open door":
            return "The door is unlocked: I open it and leave."
        if verb == "open":
            return f"The {box} rattled when I shook it, so the key is in it: I open it."
        if verb == "shake":
            why = f"opening an unshaken box like the {student_action.partition(' ')[2]} risks the trap, so " \
                if student_action.startswith("open ") and student_action != "open door" else ""
            return f"No box has rattled yet; {why}I shake the {box}, the next one I have not shaken."
        return f"Nothing else to do, so I {action}."

    def unjustified(self, inputs: StudentInputs, privileged: PrivilegedState, action: str) -> str | None:
        """Opening a box that did not rattle is justified only by a privileged state that names that box."""
        verb, _, box = action.partition(" ")
        facts = " ".join([privileged.to_text(), privileged.oracle_action or ""])
        if verb == "open" and box != "door" and box != rattled(inputs) and re.search(rf"\b{re.escape(box)}\b", facts):
            return f"opens the {box}, which only the privileged state says holds the key"
        return super().unjustified(inputs, privileged, action)
