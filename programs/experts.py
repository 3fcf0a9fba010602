"""Privileged experts: programs that see what the student cannot and say what it should have done.

Every expert answers the same question, `PrivilegedCorrection`: given the student's inputs and its step,
plus the privileged state, the corrected reason and action. The scripted `OracleExpert` reads the oracle's
next action from the privileged state; `PrivilegedExpert` asks any LM (LiteLLM model string or local).
"""

from __future__ import annotations

import re

import dspy
from leap_dspy.envs.alfworld.notes import read_note, task_lamp, task_object
from leap_dspy.envs.alfworld.notes import scene_places as _scene_of
from leap_dspy.envs.alfworld.policy import APPLIANCE, admissible_from, scripted_action, task_change, task_target
from leap_dspy.signatures import PrivilegedCorrection, StepFix, StudentTurn, TrajectoryCorrection

from leap_dspy.adapters import CompactChatAdapter
from leap_dspy.types import PrivilegedState, StudentInputs


class MissingPrivilege(ValueError):
    pass


class OracleExpert(dspy.Module):
    """The scripted expert: the environment's own oracle action, with a reason written from the student's
    view only (templates over the task, the observation and the action), so that the reason is realizable.

    The oracle knows everything, so it is what the scripted expert follows at the environment's top privilege
    level. Below it, on ALFWorld, it plays a scripted policy that uses only what the level grants
    (`envs/alfworld/policy.py`: level 0 the student's own view, 1 adds object locations, 2 their states).
    """

    requires_oracle = True
    reads_privileged_text = False

    def __init__(self, realizable_search: bool = True) -> None:
        super().__init__()
        self.realizable_search = realizable_search
        """While the student has not yet seen what the task needs, where to look next is a guess for the
        student but a certainty for the oracle, which knows where things are. Corrections that send the
        student straight to the hidden object cannot be learned from the student's inputs (they are not
        realizable) and teach it to wander; with this on, the expert searches the way the student can: it
        opens what is closed here, or sweeps the scene in the order its first observation lists the places,
        going on from where it stands to the next place not yet visited (`sweep_next`). Once the thing is in
        view, or in hand, the oracle leads again."""

    def forward(self, task: str, observation: str, history: str, student_reason: str, student_action: str,
                privileged_state: PrivilegedState) -> dspy.Prediction:
        action = privileged_state.oracle_action
        if not action and privileged_state.level >= 0:
            action = scripted_action(task, observation, history, privileged_state.level,
                                     {k: v for k, v in privileged_state.sections.items() if isinstance(v, list)})
            if action is None:
                raise MissingPrivilege(
                    "OracleExpert below the top privilege level plays a scripted policy over the student's "
                    "notes, which this environment does not keep, or which has no move left here"
                )
        elif not action:
            raise MissingPrivilege(
                "OracleExpert needs the oracle's next action in the privileged state; it is only given at the "
                "environment's top privilege level"
            )
        elif self.realizable_search:
            action = realizable_search_action(task, observation, history, student_action, action)
        if action.strip() == student_action.strip() and student_reason.strip():
            return dspy.Prediction(reason=student_reason, action=action)
        return dspy.Prediction(reason=realizable_reason(task, observation, action, history), action=action)


class PrivilegedExpert(dspy.Module):
    """An LM expert over `PrivilegedCorrection`: `model` is any LiteLLM model string (`openai/gpt-4o`,
    `anthropic/...`, `ollama/...`, `hosted_vllm/...`) or a ready `dspy.LM` (a local model).

    `per="trajectory"` makes LEAP ask once per student trajectory (`TrajectoryCorrection`, a typed list of
    per-step fixes, as the paper's code does with GPT-4o) instead of once per step: far fewer calls and a
    prompt that shows where the attempt went wrong, for one long answer that must cover every step.
    """

    requires_oracle = False
    reads_privileged_text = True

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
            model = dspy.LM(model, **lm_kwargs)
        if model is not None:
            self.correct.lm = self.correct_all.lm = model

    def correct_trajectory(self, task: str, steps: list[StudentTurn],
                           privileged_state: PrivilegedState | str) -> list[StepFix]:
        """The expert's fixes for a whole trajectory, one call; steps it skipped are simply absent."""
        text = privileged_state.to_text() if isinstance(privileged_state, PrivilegedState) else privileged_state
        with dspy.context(adapter=self.adapter):
            out = self.correct_all(task=task, steps=steps, privileged_state=text)
        return [fix if isinstance(fix, StepFix) else StepFix.model_validate(fix) for fix in out.corrections or []]

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
        self.correct.lm = self.correct_all.lm = lms[0]


def expert_inputs(inputs: StudentInputs, student_reason: str, student_action: str,
                  privileged: PrivilegedState) -> dict[str, object]:
    return {**inputs.model_dump(), "student_reason": student_reason, "student_action": student_action,
            "privileged_state": privileged}


# -- realizable reasons ---------------------------------------------------------------------------------------
#
# A reason is worth imitating when it states the sub-goal the action serves ("I carry the mug to the
# microwave"), and it is realizable when everything it names is in the action (which is admissible, so
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
    admissible = set(admissible_from(observation))
    unvisited = read_note(observation, "Unvisited")
    if unvisited is not None:  # the notes keep the scene's order, less the places been to: take the first
        return next((p for p in unvisited.split(", ") if f"go to {p}" in admissible), None)
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
            return scripted_action(task, observation, history, 0) or oracle
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
    if wrong and re.match(rf"^(?:move|put) {re.escape(wrong)} ", text):
        return f"The {wrong} is not a {goal}: I put it down here."
    if wrong and text.startswith("go to "):
        return f"The {wrong} is not a {goal}: I take it to the {text.removeprefix('go to ')}."
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
        if missing is None:
            return f"Need {need}: I saw one at the {m['x']}."
        if m["x"] == sweep_next(observation, history):
            if read_note(observation, "Unvisited") is not None:
                return f"Need {need}: not seen yet, the first unvisited is the {m['x']}."
            current = current_place(observation, history)
            if current is None:
                return f"Need {need}: I start with the {m['x']}."
            return f"Need {need}: none here, after the {current} comes the {m['x']}."
        return f"Need {need}: I check the {m['x']}."
    if m:
        return f"Carrying the {held} to the {m['x']}."
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
    m = re.match(r"^search\[(?P<q>.*)\]$", text)
    if m:
        return "I search for the product the task describes."
    m = re.match(r"^click\[(?P<b>.*)\]$", text)
    if m:
        return f"I click {m['b']} to get closer to the product the task asks for."
    if text == "submit":
        return "The output now answers the task, so I submit."
    return "This command is the next step towards the task."
