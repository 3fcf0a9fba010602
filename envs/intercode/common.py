"""What InterCode's Bash and SQL environments share: the submit action, the split caps and the oracle.

Both grade the last output at `submit` against the gold command's, so the scripted oracle is the same: run the
gold command, then submit.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from leap_dspy.envs.base import TextEnv
from leap_dspy.types import SPLITS, Split, Task

SUBMIT = "submit"


def truncate(text: str, limit: int) -> str:
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters]"


def clip(text: str, limit: int) -> str:
    """One line's worth: whitespace folded, cut with an ellipsis (`truncate` keeps the lines and counts the cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InterCodeEnv(TextEnv):
    """The shared part: subclasses set `task`, `done`, `actions` per episode and build `_build_splits()`."""

    answer_tokens: ClassVar[int] = 256
    """A gold command or query can run to a pipeline of several programs, or a join over several tables."""

    reports_score: ClassVar[bool] = True
    """Rewards are graded (partial credit for a near answer): metrics report the mean reward x 100 next to the
    success rate (reward 1), which a small student rarely reaches."""
    num_train: int | None = None
    num_seen: int | None = None
    task: Task | None = None
    done: bool = False
    actions: list[str]
    _splits: dict[str, list[Task]] | None = None

    task_file: str | None = None
    """Your own tasks (`data.task_file`): the splits the file gives replace the task set's."""
    _file_records: Sequence[dict[str, str]] = ()

    @abstractmethod
    def _build_splits(self) -> dict[str, list[Task]]: ...

    @abstractmethod
    def _file_task(self, record: dict[str, str], index: int, split: Split) -> Task: ...

    @functools.cached_property
    def file_tasks(self) -> list[Task]:
        """Your own tasks (`task_file`), built once: a check as the file loads and the task lists read the same."""
        return [self._file_task(record, i, record["split"]) for i, record in enumerate(self._file_records)]  # type: ignore[arg-type]

    def tasks(self, split: Split) -> list[Task]:
        if self._splits is None:
            mine: dict[str, list[Task]] = {}
            for task in self.file_tasks:
                mine.setdefault(task.split, []).append(task)
            # The task set is built (and, for Bash, checked in sandboxes) only if the file leaves it a split.
            self._splits = {**(self._build_splits() if set(SPLITS) - set(mine) else {}), **mine}
        limit = {"train": self.num_train, "seen": self.num_seen}.get(split)  # a small run's subset, same order
        return list(self._splits[split][:limit])

    def oracle_action(self) -> str | None:
        if self.task is None or self.done:
            return None
        if self.actions and self.actions[-1] == self.task.gold.strip():
            return SUBMIT
        return self.task.gold.strip()
