"""Privileged experts: programs that see what the student cannot and say what it should have done.

Every expert answers the same question, `PrivilegedCorrection`: given the student's inputs and its step,
plus the privileged state, the corrected reason and action. The scripted `OracleExpert` reads the oracle's
next action from the privileged state; `PrivilegedExpert` asks any LM (LiteLLM model string or local).
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any

import dspy

from leap_dspy.adapters import CompactChatAdapter
from leap_dspy.envs.expertise import Expertise
from leap_dspy.signatures import PrivilegedCorrection, PrivilegedStep, StepFix, StudentTurn, TrajectoryCorrection
from leap_dspy.types import PrivilegedState, StudentInputs


class MissingPrivilege(ValueError):
    pass


ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("leap_expert_attempt", default=0)
"""Which attempt of a retried expert call this is (set by `Corrector.ask`; 0 for the first)."""


def _retry_config() -> dict[str, object]:
    """A retry asks the LM again instead of DSPy's cache, which holds the failed attempt's answer (an unparsable
    one is cached like any other): a `rollout_id` of its own keys a separate cache entry, so a rerun still
    finds the good answer of the attempt that succeeded."""
    attempt = ATTEMPT.get()
    return {"config": {"rollout_id": attempt}} if attempt else {}


class OracleExpert(dspy.Module):
    """The scripted expert: what the environment's own expertise (`TextEnv.expertise()`) says to do and why.

    At the environment's top privilege level it may follow the oracle; below it, it plays the policy the
    environment supplies for that level, if any. Its reasons are written from the student's view only, by the
    environment (`Expertise.explain`), so that they are realizable. LEAP attaches the environment's expertise
    (`attach`); on its own it uses the generic default, which follows the oracle.
    """

    reads_oracle = True
    """Capability flags LEAP reads: it needs the oracle's next action at the top level..."""
    reads_privileged_text = False
    """...and never the privileged state rendered as text (it reads the typed sections when its expertise does)."""
    scripted = True
    """Deterministic and cheap: corrections run in one thread, and the levels it can play are its expertise's."""

    def __init__(self, expertise: Expertise | None = None) -> None:
        super().__init__()
        self.expertise = expertise or Expertise()
        self.given_expertise = expertise is not None
        """An expertise passed in is the caller's choice: `attach` keeps it."""

    def attach(self, env: object) -> None:
        """Take the environment's expertise (called by LEAP before anything is played), unless one was given."""
        if not self.given_expertise:
            self.expertise = env.expertise()  # type: ignore[attr-defined]

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState) -> dspy.Prediction:
        inputs = StudentInputs(task=task, observation=observation, history=history)
        action = self.expertise.act(inputs, privileged_state, student_action)
        if not action:
            raise MissingPrivilege(
                f"the scripted expert has no action here at privilege level {privileged_state.level}: the oracle's "
                "action is given only at the environment's top level, and below it the environment's expertise "
                "plays only at levels " + (", ".join(map(str, self.expertise.levels)) or "(none)")
            )
        if action.strip() == student_action.strip() and student_reason.strip():
            return dspy.Prediction(reason=student_reason, action=action)
        reason = self.expertise.explain(inputs, privileged_state, action, student_action)
        return dspy.Prediction(reason=reason, action=action)


class PrivilegedExpert(dspy.Module):
    """An LM expert over `PrivilegedCorrection`: `model` is any LiteLLM model string (`openai/gpt-4o`,
    `anthropic/...`, `ollama/...`, `hosted_vllm/...`) or a ready `dspy.LM` (a local model).

    `per="trajectory"` makes LEAP ask once per student trajectory (`TrajectoryCorrection`, a typed list of
    per-step fixes, as the paper's code does with GPT-4o) instead of once per step: far fewer calls and a
    prompt that shows where the attempt went wrong, for one long answer that must cover every step.
    """

    reads_oracle = False
    reads_privileged_text = True
    scripted = False

    def __init__(self, model: str | dspy.LM | None = None, adapter: dspy.Adapter | None = None,
                 per: str = "step", **lm_kwargs: object) -> None:
        super().__init__()
        if per not in ("step", "trajectory"):
            raise ValueError(f"PrivilegedExpert: per must be 'step' or 'trajectory', not {per!r}")
        self.per = per
        self.correct = dspy.Predict(PrivilegedCorrection)
        self.correct_all = dspy.Predict(TrajectoryCorrection)
        self.adapter = adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
        """ChatAdapter without its JSON retry: a failed parse is one failed attempt, retried by LEAP."""
        if isinstance(model, str):
            lm_kwargs.setdefault("timeout", 120)  # a hung endpoint must not stall an iteration for LiteLLM's 600 s
            lm_kwargs.setdefault("num_retries", 0)  # LEAP retries each call itself (`expert_retries`, with backoff)
            model = dspy.LM(model, **lm_kwargs)
        if model is not None:
            self.correct.lm = self.correct_all.lm = model

    def correct_trajectory(self, task: str, steps: list[StudentTurn],
                           privileged_state: PrivilegedState | str) -> list[StepFix]:
        """The expert's fixes for a whole trajectory, one call; steps it skipped are simply absent."""
        text = privileged_text(privileged_state)
        with dspy.context(adapter=self.adapter):
            out = self.correct_all(task=task, steps=steps, privileged_state=text, **_retry_config())
        return [fix if isinstance(fix, StepFix) else StepFix.model_validate(fix) for fix in out.corrections or []]

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState | str) -> dspy.Prediction:
        text = privileged_text(privileged_state)
        with dspy.context(adapter=self.adapter):
            return self.correct(task=task, observation=observation, history=history,
                                student_reason=student_reason, student_action=student_action, privileged_state=text,
                                **_retry_config())


class SelfExpert(PrivilegedExpert):
    """The student's own current weights, given the privileged state: the paper's self-improvement setting.

    LEAP points it at the student's latest LM before every round of corrections (`follow`), so the expert
    improves with the student. Behaviour cloning, which needs a competent demonstrator, uses the scripted
    oracle instead (see `LEAP(demonstrator=...)`), and trains these weights for the expert's part as well.

    By default it writes its step without seeing the student's (`PrivilegedStep`): shown the student's step,
    a small model learns that keeping it is the safe answer and corrects next to nothing. `sees_student=True`
    gives it the student's step to judge (`PrivilegedCorrection`), as an LM expert has.
    """

    follows_student = True
    """LEAP shares the student's weights with it (`follow`) and trains them for the expert's part as well."""

    def __init__(self, sees_student: bool = False) -> None:
        super().__init__(model=None, adapter=CompactChatAdapter())
        self.sees_student = sees_student
        self.step = dspy.Predict(PrivilegedStep)

    @property
    def signature(self) -> type[dspy.Signature]:
        """The signature its prompts follow, which behaviour cloning's expert rows must match."""
        return PrivilegedCorrection if self.sees_student else PrivilegedStep

    def follow(self, student: dspy.Module) -> None:
        lms = [p.lm for p in student.predictors() if getattr(p, "lm", None) is not None]
        if not lms:
            raise ValueError("the student has no LM to share with its privileged self")
        self.correct.lm = self.correct_all.lm = self.step.lm = lms[0]

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState | str) -> dspy.Prediction:
        if self.sees_student:
            return super().forward(task, observation, history, student_reason, student_action, privileged_state)
        text = privileged_text(privileged_state)
        with dspy.context(adapter=self.adapter):
            return self.step(task=task, observation=observation, history=history, privileged_state=text)


def privileged_text(privileged: PrivilegedState | str) -> str:
    """The privileged state as an LM expert reads it: its sections, and the oracle's next action where it was
    captured (only for an expert that sets `reads_oracle`)."""
    if not isinstance(privileged, PrivilegedState):
        return privileged
    text = privileged.to_text()
    if privileged.oracle_action:
        text = ("" if not privileged.sections else text + "\n") + f"oracle's next action:\n- {privileged.oracle_action}"
    return text


def expert_inputs(inputs: StudentInputs, student_reason: str, student_action: str,
                  privileged: PrivilegedState, as_text: bool = False) -> dict[str, object]:
    """An expert's call arguments; `as_text` renders the privileged state as text (what `reads_privileged_text`
    promises an expert that is not scripted), else the typed `PrivilegedState`."""
    return {**inputs.model_dump(), "student_reason": student_reason, "student_action": student_action,
            "privileged_state": privileged_text(privileged) if as_text else privileged}


def check_expert_call(teacher: Any) -> None:
    """Refuse, before anything runs, a teacher that cannot be called as an expert: it answers
    `PrivilegedCorrection`'s inputs, where a student-shaped teacher takes only the student's."""
    try:
        # The bound method read past dspy.Module's attribute hook, which warns on any access to `forward`.
        call = getattr(type(teacher), "forward", None)
        inspect.signature(call.__get__(teacher) if call is not None else teacher).bind(
            task="", observation="", history="", student_reason="", student_action="", privileged_state=None)
    except TypeError as exc:
        raise TypeError(f"the teacher {type(teacher).__name__} cannot be called as an expert ({exc}): it must take "
                        "task, observation, history, student_reason, student_action and privileged_state and "
                        "return reason and action (see OracleExpert, PrivilegedExpert)") from None
    except ValueError:  # no signature to read (a builtin): calling it will tell
        pass
