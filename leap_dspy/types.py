"""The records that cross module boundaries: tasks, observations, steps, trajectories, corrections.

They are pydantic models so that every JSONL line in a run folder validates on the way back in, and so that
environment-specific task fields (a game file, a database name) travel through generic code untouched.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "seen", "unseen"]
SPLITS: tuple[Split, ...] = ("train", "seen", "unseen")


class Task(BaseModel):
    """One episode's goal. Environments subclass it or put their own fields in as extras."""

    model_config = ConfigDict(extra="allow")

    id: str
    env: str
    split: Split
    instruction: str
    source: str = ""
    """Where the task comes from ("bench", "generated", a user's file): a report breaks a split down by it."""


class Observation(BaseModel):
    """What the environment returns from `reset` and `step`: the only thing the student ever sees."""

    text: str
    notes: str | None = None
    """What the episode has shown so far, kept short by an environment that can (ALFWorld: what the student
    holds, where it saw what it needs, where it has not been). Derived only from texts the student was shown,
    so it is part of the student's view; the student reads it beside `text`."""
    reward: float = 0.0
    done: bool = False
    success: bool = False
    admissible_actions: list[str] | None = None
    info: dict[str, Any] = Field(default_factory=dict)


class PrivilegedState(BaseModel):
    """Facts hidden from the student, rendered for an expert's prompt.

    `sections` keeps the facts apart by kind (object locations, the oracle plan, ...) so that the privilege
    dial can include or drop whole kinds, and so that a realizability check can see what was privileged.
    """

    level: int
    sections: dict[str, str | list[str]] = Field(default_factory=dict)
    oracle_action: str | None = None
    """The scripted oracle's next action, filled in only for experts allowed the top privilege level; never
    rendered by `to_text` on its own (the plan section, where a level includes it, says it)."""

    def to_text(self) -> str:
        if not self.sections:
            return "(no privileged information)"
        parts = []
        for name, body in self.sections.items():
            text = "\n".join(f"- {line}" for line in body) if isinstance(body, list) else body
            parts.append(f"{name}:\n{text}")
        return "\n".join(parts)


class StudentInputs(BaseModel):
    """The student's signature inputs at one step, exactly as its prompt saw them."""

    task: str
    observation: str
    history: str


class ExpertUsage(BaseModel):
    """The expert calls behind one correction: attempts, answers served from DSPy's cache, tokens billed and,
    where LiteLLM knows the model's price, their cost in US dollars."""

    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None

    def __add__(self, other: ExpertUsage) -> ExpertUsage:
        costs = [c for c in (self.cost_usd, other.cost_usd) if c is not None]
        return ExpertUsage(calls=self.calls + other.calls, cached=self.cached + other.cached,
                           prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                           completion_tokens=self.completion_tokens + other.completion_tokens,
                           cost_usd=sum(costs) if costs else None)


class Step(BaseModel):
    """One student decision and what the environment answered."""

    index: int
    inputs: StudentInputs
    reason: str = ""
    action: str = ""
    admissible_actions: list[str] | None = None
    next_observation: str = ""
    reward: float = 0.0
    done: bool = False
    error: str | None = None
    """Why the model's output could not be used (parse failure, no action), recorded instead of raised."""
    valid: bool = True
    """False when the environment rejected the action (its observation's `info["valid"]` is False): what an
    environment without an admissible list says instead, so a demonstration of such an action is dropped."""
    executed: str | None = None
    """The admissible action the environment ran instead of `action`, when the student's `action` was a near
    miss that it snapped to its list (see `Student.snap_actions`); None when `action` itself ran."""
    privileged: PrivilegedState | None = None
    """The privileged state at this step, captured for the expert while the environment was in it. Only
    experts read it; student training rows are built from `inputs` alone."""
    expert_usage: ExpertUsage | None = None
    """What the expert's calls for this step cost, where an LM expert played it (demonstrations, the expert's
    reference row): the stage's bill counts every call, won episode or not."""


class Trajectory(BaseModel):
    task: Task
    policy: str
    steps: list[Step] = Field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    wall_s: float = 0.0
    error: str | None = None
    """Why the episode ended early: the environment's own code raised (see `EnvironmentFailed`), or an expert
    playing it had no action (`PolicyFailed`); the steps before it are kept, and it counts as a failure."""
    policy_failed: bool = False
    """`error` is the policy's (an expert's failed step, kept as the last step), not the environment's."""

    @property
    def num_errors(self) -> int:
        return sum(step.error is not None for step in self.steps)

    @property
    def num_snapped(self) -> int:
        return sum(step.executed is not None for step in self.steps)


class Correction(BaseModel):
    """The expert's realizable reason and action for a state the student visited.

    `inputs` are the student's own inputs at that state: training rows are built from these alone, so that a
    privileged fact can never reach a student prompt.
    """

    task_id: str
    step: int
    inputs: StudentInputs
    student_reason: str = ""
    student_action: str = ""
    reason: str
    action: str
    expert: str
    level: int = 0
    iteration: int = 0
    source: Literal["demonstration", "correction"] = "correction"
    dropped: str | None = None
    """Why this record is kept out of training (an inadmissible action, an expert failure), if it is."""
    unobserved: list[str] = Field(default_factory=list)
    """What the reason names that the student never saw (see `leap_dspy.realizability`): non-empty means the
    correction is not realizable."""
    unjustified: str | None = None
    """Why the action is one only the privileged state could justify, where the environment can tell
    (`Expertise.unjustified`); the student could not have chosen it from its own inputs."""
    usage: ExpertUsage | None = None
    """What asking an LM expert for this record cost; None where no LM was asked (demonstrations, scripts)."""

    @property
    def changed(self) -> bool:
        return self.action.strip() != self.student_action.strip()

    @property
    def key(self) -> str:
        """Identity within a run: one record per (iteration, task, step), so a resumed run never duplicates."""
        return f"{self.iteration}:{self.task_id}:{self.step}"
