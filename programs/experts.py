"""Privileged experts: programs that see what the student cannot and say what it should have done.

Every expert answers the same question, `PrivilegedCorrection`: given the student's inputs and its step,
plus the privileged state, the corrected reason and action. The scripted `OracleExpert` reads the oracle's
next action from the privileged state; `PrivilegedExpert` asks any LM (LiteLLM model string or local).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import dspy
from leap_dspy.signatures import PrivilegedCorrection

from leap_dspy.adapters import CompactChatAdapter
from leap_dspy.types import PrivilegedState, StudentInputs


class MissingPrivilege(ValueError):
    pass


class OracleExpert(dspy.Module):
    """The scripted expert: the environment's own oracle action, with a reason written from the student's
    view only (templates over the task, the observation and the action), so that the reason is realizable.
    """

    requires_oracle = True
    reads_privileged_text = False

    def __init__(self) -> None:
        super().__init__()

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState) -> dspy.Prediction:
        action = privileged_state.oracle_action
        if not action:
            raise MissingPrivilege(
                "OracleExpert needs the oracle's next action in the privileged state; it is only given at the "
                "environment's top privilege level"
            )
        if action.strip() == student_action.strip() and student_reason.strip():
            return dspy.Prediction(reason=student_reason, action=action)
        return dspy.Prediction(reason=realizable_reason(task, observation, action), action=action)


class PrivilegedExpert(dspy.Module):
    """An LM expert over `PrivilegedCorrection`: `model` is any LiteLLM model string (`openai/gpt-4o`,
    `anthropic/...`, `ollama/...`, `hosted_vllm/...`) or a ready `dspy.LM` (a local model)."""

    requires_oracle = False
    reads_privileged_text = True

    def __init__(self, model: str | dspy.LM | None = None, adapter: dspy.Adapter | None = None,
                 **lm_kwargs: object) -> None:
        super().__init__()
        self.correct = dspy.Predict(PrivilegedCorrection)
        self.adapter = adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
        """ChatAdapter without its JSON retry: a failed parse is one failed attempt, retried by LEAP."""
        if isinstance(model, str):
            lm_kwargs.setdefault("timeout", 120)  # a hung endpoint must not stall an iteration for LiteLLM's 600 s
            self.correct.lm = dspy.LM(model, **lm_kwargs)
        elif model is not None:
            self.correct.lm = model

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState | str) -> dspy.Prediction:
        text = privileged_state.to_text() if isinstance(privileged_state, PrivilegedState) else privileged_state
        with dspy.context(adapter=self.adapter):
            return self.correct(task=task, observation=observation, history=history,
                                student_reason=student_reason, student_action=student_action, privileged_state=text)


class SelfExpert(PrivilegedExpert):
    """The student's own current weights, given the privileged state: the paper's self-improvement setting.

    LEAP points it at the student's latest LM before every round of corrections (`follow`), so the expert
    improves with the student. Behaviour cloning, which needs a competent demonstrator, uses the scripted
    oracle instead (see `LEAP(demonstrator=...)`).
    """

    def __init__(self) -> None:
        super().__init__(model=None, adapter=CompactChatAdapter())

    def follow(self, student: dspy.Module) -> None:
        lms = [p.lm for p in student.predictors() if getattr(p, "lm", None) is not None]
        if not lms:
            raise ValueError("the student has no LM to share with its privileged self")
        self.correct.lm = lms[0]


def expert_inputs(inputs: StudentInputs, student_reason: str, student_action: str,
                  privileged: PrivilegedState) -> dict[str, object]:
    return {**inputs.model_dump(), "student_reason": student_reason, "student_action": student_action,
            "privileged_state": privileged}


# -- realizable reasons ---------------------------------------------------------------------------------------

_Template = tuple[re.Pattern[str], Callable[[re.Match[str], str, str], str]]


def _seen(thing: str, observation: str) -> bool:
    return re.search(rf"\b{re.escape(thing)}\b", observation) is not None


def _go(m: re.Match[str], task: str, observation: str) -> str:
    place = m["place"]
    return f"I go to {place}, a place I can see in the room that may help with the task."


_TEMPLATES: list[_Template] = [
    (re.compile(r"^go to (?P<place>.+)$"), _go),
    (re.compile(r"^open (?P<x>.+)$"), lambda m, t, o: f"The {m['x']} is closed, so I open it to look inside."),
    (re.compile(r"^close (?P<x>.+)$"), lambda m, t, o: f"I am done with the {m['x']}, so I close it."),
    (re.compile(r"^take (?P<obj>.+) from (?P<place>.+)$"),
     lambda m, t, o: f"I see the {m['obj']} here and the task needs it, so I take it."),
    (re.compile(r"^(?:move|put) (?P<obj>.+?) (?:to|in/on|in|on) (?P<place>.+)$"),
     lambda m, t, o: f"I hold the {m['obj']} and the task wants it at the {m['place']}, so I put it there."),
    (re.compile(r"^heat (?P<obj>.+) with (?P<x>.+)$"),
     lambda m, t, o: f"The task needs a hot {m['obj'].split()[0]}, so I heat it with the {m['x']}."),
    (re.compile(r"^cool (?P<obj>.+) with (?P<x>.+)$"),
     lambda m, t, o: f"The task needs a cool {m['obj'].split()[0]}, so I cool it with the {m['x']}."),
    (re.compile(r"^clean (?P<obj>.+) with (?P<x>.+)$"),
     lambda m, t, o: f"The task needs a clean {m['obj'].split()[0]}, so I clean it with the {m['x']}."),
    (re.compile(r"^use (?P<x>.+)$"), lambda m, t, o: f"I turn on the {m['x']} to look at what I hold in its light."),
    (re.compile(r"^search\[(?P<q>.*)\]$"), lambda m, t, o: "I search for the product the task describes."),
    (re.compile(r"^click\[(?P<b>.*)\]$"), lambda m, t, o: f"The {m['b']} button brings me closer to the task."),
    (re.compile(r"^submit$"), lambda m, t, o: "The output now answers the task, so I submit."),
]


def realizable_reason(task: str, observation: str, action: str) -> str:
    """A one-sentence reason built from the action and what the student can see, never from privileged
    facts (it names only things that occur in the action, which is admissible, or in the task)."""
    text = action.strip()
    for pattern, write in _TEMPLATES:
        match = pattern.match(text)
        if match:
            return write(match, task, observation)
    return "This command is the next step towards the task."
