"""The text-environment protocol every LEAP environment implements.

It follows gymnasium's reset/step shape, with text in and text out, plus the two things LEAP needs beyond
gymnasium: the privileged state (what only the expert may read) and a scripted oracle's next action.
One instance runs one episode at a time; `clone()` gives another instance over the same task sets, so that
many episodes can run side by side.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from leap_dspy.envs.expertise import Expertise
from leap_dspy.types import Observation, PrivilegedState, Split, Task


class TextEnv(ABC):
    name: ClassVar[str]
    """The name the CLI and the run folder use (`alfworld`, `webshop`, ...)."""

    privilege_levels: ClassVar[dict[int, str]] = {0: "nothing"}
    """What each level of the privilege dial exposes; level 0 is always nothing."""

    default_privilege_level: ClassVar[int] = 0
    max_steps: int = 30
    answer_tokens: ClassVar[int] = 80
    """Tokens a student's answer (a reason and an action) may need here: LEAP's default `max_new_tokens`. An
    answer cut short loses its action, so an environment whose commands or queries run long asks for more."""

    reports_score: ClassVar[bool] = False
    """Whether the reward is a graded score worth showing beside success (WebShop's, InterCode's): reports and
    tables then have a score column."""

    idle_actions: ClassVar[tuple[str, ...]] = ()
    """Admissible actions that change nothing and teach nothing when proposed as a wrong step (ALFWorld's
    `look`); the privileged self's training rows propose other actions instead."""

    @abstractmethod
    def tasks(self, split: Split) -> list[Task]:
        """The split's tasks, reproducible from the environment's seed."""

    @abstractmethod
    def reset(self, task: Task) -> Observation: ...

    @abstractmethod
    def step(self, action: str) -> Observation:
        """Apply an action. An invalid action never raises: the observation says what went wrong."""

    @abstractmethod
    def privileged_state(self, level: int) -> PrivilegedState: ...

    @abstractmethod
    def oracle_action(self) -> str | None:
        """The scripted expert's next action from the current state, or None when it has none."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this environment (written to a run's config.yaml)."""

    def expertise(self) -> Expertise:
        """What a scripted expert knows here (see `leap_dspy.envs.expertise`): how to act at each privilege
        level below the top, and how to explain an action from the student's view. The default follows the
        oracle with an honest, generic reason; override it to teach more."""
        return Expertise()

    def clone(self) -> TextEnv:
        """A fresh instance over the same tasks, for running another episode side by side."""
        return type(self)(**self.config())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes or files held for the current episode."""

    def check_level(self, level: int) -> int:
        if level not in self.privilege_levels:
            known = ", ".join(f"{k} ({v})" for k, v in self.privilege_levels.items())
            raise ValueError(f"{self.name}: privilege level {level} is not one of {known}")
        return level


_PLACEHOLDER = re.compile(r"<[^<>]+>")


def action_admissible(action: str, admissible: list[str] | None) -> bool:
    """Whether `action` is one of `admissible`, where an entry may be a template with `<placeholders>`
    (WebShop lists `search[<keywords>]`). Unknown lists (None) admit everything."""
    if admissible is None:
        return True
    action = action.strip()
    for entry in admissible:
        if entry == action:
            return True
        if "<" in entry:
            pieces = _PLACEHOLDER.split(entry)
            holes = len(_PLACEHOLDER.findall(entry))
            pattern = ".+".join(re.escape(p) for p in pieces) if holes else re.escape(entry)
            if re.fullmatch(pattern, action, flags=re.DOTALL):
                return True
    return False
