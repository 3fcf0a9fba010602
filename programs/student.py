"""The student: a DSPy agent that sees only its task, observation and recent history."""

from __future__ import annotations

import difflib
import time
from typing import Any

import dspy
from rich.markup import escape

from leap_dspy.adapters import END_MARKER, CompactChatAdapter
from leap_dspy.envs.base import action_admissible
from leap_dspy.progress import console
from leap_dspy.signatures import STUDENT_INPUTS, StudentStep
from leap_dspy.types import Observation, PrivilegedState, Step, StudentInputs, Task, Trajectory


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split()) if "\n" not in text else text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Student(dspy.Module):
    """`StudentStep` in an agent loop.

    The prompt is what a step costs on a CPU, so the program bounds it (and formats it with the compact
    adapter by default): the environment's notes when it keeps them (see `show_notes`), else the scene the
    episode started in (the first paragraph of the first observation,
    `remember_start_chars` at most: a room's furniture, a shop's front page), the student's earlier actions,
    once each; the last `history_window` steps (action and a clipped observation), a clipped observation,
    and the admissible actions when the environment knows them (a small model picks far better from a list
    than from memory).
    """

    def __init__(
        self,
        history_window: int = 2,
        max_observation_chars: int = 1100,
        max_history_observation_chars: int = 120,
        show_admissible_actions: bool = True,
        max_invalid_streak: int = 4,
        adapter: dspy.Adapter | None = None,
        remember_actions: int = 16,
        remember_start_chars: int = 300,
        snap_actions: bool = True,
        show_notes: bool = True,
    ) -> None:
        super().__init__()
        self.adapter = adapter or CompactChatAdapter()
        """How the student's prompts are formatted and parsed. It belongs to the program, not to the global
        DSPy settings, because the fine-tuned weights only understand the format they were trained on."""
        # Stop as the end-of-answer marker begins instead of generating it: the parser needs only the fields.
        self.step = dspy.Predict(StudentStep, stop=[f"[[ ## {END_MARKER}"])
        self.remember_actions = remember_actions
        self.remember_start_chars = remember_start_chars
        self.history_window = history_window
        self.max_observation_chars = max_observation_chars
        self.max_history_observation_chars = max_history_observation_chars
        self.show_admissible_actions = show_admissible_actions
        self.max_invalid_streak = max_invalid_streak
        self.snap_actions = snap_actions
        self.show_notes = show_notes
        """Show the environment's notes (`Observation.notes`) after the observation. Notes are the memory
        an environment can keep better than a transcript can (ALFWorld: what the student holds, where it saw
        what it needs, where it has not been); when an observation has them they replace the `Start:` and
        `Earlier:` lines, which serve the same purpose for environments without notes."""
        """When the environment lists its admissible actions and the student writes one that is not among
        them but close to one ("take tomato from countertop" for "take tomato 2 from countertop 1"), run the
        closest instead (`snap_action`), as text-game agents commonly do: a small model's slips of a number or
        an article then cost nothing, while its `action` is still recorded as written (and corrected) and the
        substitution is kept in `Step.executed`. Only numbers and articles are forgiven: an action that names
        another object or place runs as written, and the environment says it is invalid."""

    def settings(self) -> dict[str, object]:
        """What shapes its prompts and its episodes, as a run's config.yaml records it."""
        names = ("history_window", "max_observation_chars", "max_history_observation_chars",
                 "show_admissible_actions", "max_invalid_streak", "remember_actions", "remember_start_chars",
                 "snap_actions", "show_notes")
        return {"name": type(self).__name__, "adapter": type(self.adapter).__name__,
                **{name: getattr(self, name) for name in names}}

    @staticmethod
    def init_args(settings: dict[str, object]) -> dict[str, object]:
        """The constructor arguments in `settings()` as a run recorded them: all but the class's name and the
        adapter's (a run records only its name; the student's class builds its own)."""
        return {k: v for k, v in settings.items() if k not in ("name", "adapter")}

    def forward(self, task: str, observation: str, history: str) -> dspy.Prediction:
        with dspy.context(adapter=self.adapter):
            return self.step(task=task, observation=observation, history=history)

    # -- the agent loop ------------------------------------------------------------------------------------

    def inputs(self, task: Task, observation: Observation, past: list[Step]) -> StudentInputs:
        """The student's view of the current state: all that a student prompt or training row contains."""
        text = _clip(observation.text, self.max_observation_chars)
        if self.show_notes and observation.notes:
            text += "\n" + observation.notes
        if self.show_admissible_actions and observation.admissible_actions:
            text += "\nActions: " + ", ".join(observation.admissible_actions)
        recent = past[-self.history_window :] if self.history_window > 0 else []
        lines = [
            f"{_ran(step) or '(no action)'} -> {_clip(step.next_observation, self.max_history_observation_chars)}"
            for step in recent
        ]
        earlier = past[: len(past) - len(recent)]
        kept_by_notes = self.show_notes and observation.notes
        if self.remember_actions and earlier and not kept_by_notes:
            # The student's own earlier actions, once each, newest last: enough to not search the same place
            # twice, for a few tokens per action instead of a whole transcript.
            seen: dict[str, None] = {}
            for action in filter(None, map(_ran, earlier)):
                seen.pop(action, None)
                seen[action] = None
            lines.insert(0, "Earlier: " + "; ".join(list(seen)[-self.remember_actions :]))
        if self.remember_start_chars and past and not kept_by_notes:
            # The scene never comes back once the window moves on, and it is the map a search follows.
            scene = past[0].inputs.observation.split("\nActions: ")[0].split("\n\n")[0]
            lines.insert(0, "Start: " + _clip(scene, self.remember_start_chars))
        return StudentInputs(task=task.instruction, observation=text, history="\n".join(lines) or "(none)")

    def act(self, inputs: StudentInputs) -> tuple[str, str, str | None]:
        """(reason, action, error): a malformed model output becomes a recorded error, never an exception."""
        try:
            prediction = self(**inputs.model_dump())
        except (dspy.utils.exceptions.AdapterParseError, ValueError) as exc:
            return "", "", f"{type(exc).__name__}: {_clip(str(exc), 300)}"
        reason = str(getattr(prediction, "reason", "") or "").strip()
        action = str(getattr(prediction, "action", "") or "").strip().splitlines()
        action_text = action[0].strip() if action else ""
        return reason, action_text, None if action_text else "the model gave no action"

    def run(self, env: Any, task: Task, max_steps: int | None = None, capture_level: int | None = None,
            capture_oracle: bool = False, policy: str = "student", snap: bool | None = None,
            max_stuck: int = 0) -> Trajectory:
        """Play one episode, recording what an expert will need to correct each step (see `run_episode`);
        `snap` None follows `snap_actions`."""
        return run_episode(self.act, self.inputs, env, task, max_steps=max_steps, capture_level=capture_level,
                           capture_oracle=capture_oracle, policy=policy, max_invalid_streak=self.max_invalid_streak,
                           snap=self.snap_actions if snap is None else snap, max_stuck=max_stuck)


def _repeats(steps: list[Step]) -> bool:
    """Whether the last step ran the action before it and saw the same thing: nothing changed."""
    return (len(steps) > 1 and _ran(steps[-1]) == _ran(steps[-2])
            and steps[-1].next_observation == steps[-2].next_observation)


def _ran(step: Step) -> str:
    return step.executed or step.action


def _gist(action: str) -> tuple[str, ...]:
    """An action's words without numbers and articles: what a near miss must still get right."""
    return tuple(w for w in action.lower().split() if not w.isdigit() and w not in ("a", "an", "the"))


def snap_action(action: str, admissible: list[str] | None) -> str | None:
    """The admissible action that `action` misses only by numbers or articles ("take tomato from
    countertop" -> "take tomato 2 from countertop 1"), the closest word by word when several do; None when
    `action` is admissible itself, when no admissible action has the same words, or when the list is unknown
    or holds templates such as WebShop's `search[<keywords>]`, whose free text cannot be snapped."""
    if not action or not admissible or any("<" in entry for entry in admissible):
        return None
    if action_admissible(action, admissible):
        return None
    gist, words = _gist(action), action.lower().split()
    candidates = [entry for entry in admissible if _gist(entry) == gist]
    if not candidates:
        return None
    return max(candidates, key=lambda entry: difflib.SequenceMatcher(None, words, entry.lower().split(),
                                                                     autojunk=False).ratio())


def has_near_miss(trajectory: Trajectory) -> bool:
    """Whether one of the episode's actions was a near miss (see `snap_action`), so snapping would change it."""
    return any(snap_action(step.action, step.admissible_actions) for step in trajectory.steps)


class EpisodeEnded(Exception):
    """What an episode cannot go on without failed: `run_episode` records it and ends that episode alone, so
    that one broken task neither stops a compile nor, replayed greedily on resume, stops it again."""


class EnvironmentFailed(EpisodeEnded):
    """The environment's own code raised inside an episode, or returned what the contract does not."""


class PolicyFailed(EpisodeEnded):
    """The policy gave no action at a step (`run_episode(end_on_failure=True)`: an expert's failure)."""


def env_call(what: str, call: Any, *args: Any, returns: type | None = None) -> Any:
    """`call(*args)`, a method of the environment, with any exception it raises, or a result that is not of the
    type it `returns` (a `str` for an `Observation`, say), turned into `EnvironmentFailed` naming it (`what`)."""
    try:
        result = call(*args)
    except Exception as exc:
        raise EnvironmentFailed(f"the environment's {what} raised {type(exc).__name__}: {exc}") from exc
    if returns is not None and not isinstance(result, returns):
        raise EnvironmentFailed(f"the environment's {what} returned {type(result).__name__}, not a "
                                f"leap_dspy.types.{returns.__name__}")
    return result


def capture_privileged(env: Any, level: int | None, oracle: bool) -> PrivilegedState | None:
    """What an expert will read about the current state: the privileged state at `level` (None: not read), the
    oracle's next action if `oracle`; None when it reads neither."""
    if level is None and not oracle:
        return None
    state = PrivilegedState(level=-1)
    if level is not None:
        state = env_call("privileged_state()", env.privileged_state, level, returns=PrivilegedState)
    state.oracle_action = env_call("oracle_action()", env.oracle_action) if oracle else None
    return state


def run_episode(act: Any, make_inputs: Any, env: Any, task: Task, *, max_steps: int | None = None,
                capture_level: int | None = None, capture_oracle: bool = False, policy: str = "student",
                max_invalid_streak: int = 0, snap: bool = False, max_stuck: int = 0,
                end_on_failure: bool = False, warn: bool = True) -> Trajectory:
    """The loop shared by every policy: observe, decide, step, record.

    `capture_level` records the privileged state at each step (for an LM expert's prompt) and
    `capture_oracle` the oracle's next action (for the scripted expert): each only when the expert reads it,
    since a full plan can cost far more than the step itself.

    An episode also ends after `max_invalid_streak` consecutive unusable steps (a malformed output, an
    action the environment rejected, or one it says changed nothing, `info["changed"] = False`): with greedy
    decoding a policy that fails that often in a row is stuck, and playing out its remaining steps would only
    spend the step budget of a rollout.

    `max_stuck` (0: off) ends it once the same action has left the observation unchanged that many times in a
    row. A valid action can still be a loop (WebShop's `click[6 ounce]` on a page where it is already
    selected); rollouts stop there, since the expert's corrections of further repeats would be copies of one
    state's, and enough copies outweigh the rest of a round's data.

    When the environment's own code raises (`reset`, `step`, `privileged_state`, `oracle_action`) or returns
    what the contract does not (a `str` for an `Observation`), the episode ends there with the failure in
    `Trajectory.error` and a warning; the episodes beside it play on. `end_on_failure` ends it the same way at
    a step `act` failed (an expert's: it has no action to play, and asked again in the same state a scripted
    one fails alike), the step kept with its error and the environment not stepped. `warn=False` leaves the
    warning to the caller.
    """
    start = time.perf_counter()
    limit = max_steps or getattr(env, "max_steps", 30)
    trajectory = Trajectory(task=task, policy=policy)
    streak = stuck = 0
    try:
        observation = env_call(f"reset({task.id!r})", env.reset, task, returns=Observation)
        for index in range(limit):
            inputs = make_inputs(task, observation, trajectory.steps)
            privileged = capture_privileged(env, capture_level, capture_oracle)
            reason, action, error = act(inputs)
            admissible = observation.admissible_actions
            step = Step(index=index, inputs=inputs, reason=reason, action=action, admissible_actions=admissible,
                        next_observation=observation.text, reward=observation.reward, error=error,
                        privileged=privileged, valid=False)  # as it stands where the policy failed
            if error is not None and end_on_failure:
                trajectory.steps.append(step)
                raise PolicyFailed(error)
            executed = snap_action(action, admissible) if snap else None
            observation = env_call(f"step({executed or action!r})", env.step, executed or action,
                                   returns=Observation)
            rejected = observation.info.get("valid") is False
            trajectory.steps.append(step.model_copy(update={
                "next_observation": observation.text, "reward": observation.reward, "done": observation.done,
                "executed": executed, "valid": not rejected}))
            invalid = (error is not None or rejected or observation.info.get("changed") is False
                       or not action_admissible(executed or action, admissible))
            streak = streak + 1 if invalid else 0
            stuck = stuck + 1 if _repeats(trajectory.steps) else 0
            stopped = (max_invalid_streak and streak >= max_invalid_streak) or (max_stuck and stuck >= max_stuck)
            if observation.done or stopped:
                break
        trajectory.success = bool(observation.success)
        trajectory.reward = float(observation.reward)
    except EpisodeEnded as failure:
        trajectory.policy_failed = isinstance(failure, PolicyFailed)  # its failed step is kept, as the last
        trajectory.error = f"step {len(trajectory.steps) - trajectory.policy_failed}: {failure}"
        ended = f"{policy} episode of task {task.id} ended: {trajectory.error}"
        if warn:
            console.print(f"[yellow]warning:[/yellow] {escape(ended)}", highlight=False, soft_wrap=True)
    trajectory.wall_s = time.perf_counter() - start
    return trajectory


def check_student(student: Any) -> None:
    """Refuse, before anything runs, a student whose prompts LEAP cannot write training rows for.

    Training rows are the student's own prompts, built from `StudentInputs` (task, history, observation) and
    the expert's reason and action: a `Student` (or subclass) whose `step` is a `dspy.Predict` over exactly
    those fields. Any other signature (a renamed field, an extra input, an extra output such as `plan`, or
    `dspy.ChainOfThought`'s `reasoning`) would be trained on prompts it never sees, or on answers of "None"."""
    missing = [name for name in ("inputs", "run", "settings", "adapter", "step") if not hasattr(student, name)]
    if missing:
        raise TypeError(f"LEAP compiles a leap_dspy Student (or an Agent holding one); {type(student).__name__} "
                        f"lacks {', '.join(missing)}: subclass leap_dspy.programs.Student")
    step = student.step
    if not isinstance(step, dspy.Predict):
        raise TypeError(f"{type(student).__name__}.step must be a dspy.Predict (its signature is what the training "
                        f"rows are written in), not {type(step).__name__}")
    inputs, outputs = set(step.signature.input_fields), set(step.signature.output_fields)
    problems = []
    if inputs != set(STUDENT_INPUTS):
        problems.append(f"inputs {sorted(inputs)} (LEAP's rows give {sorted(STUDENT_INPUTS)})")
    if outputs != {"reason", "action"}:
        problems.append(f"outputs {sorted(outputs)} (the expert gives ['action', 'reason'])")
    if problems:
        raise TypeError(f"{type(student).__name__}.step's signature has " + " and ".join(problems) + ": LEAP's "
                        "training rows would not match the student's prompts")
    try:
        student.adapter.format_finetune_data(signature=step.signature, demos=[], inputs=dict.fromkeys(inputs, ""),
                                             outputs={"reason": "", "action": ""})
    except NotImplementedError:
        raise TypeError(f"{type(student.adapter).__name__} cannot write fine-tuning rows (format_finetune_data); "
                        "give the student a ChatAdapter (the default CompactChatAdapter is one)") from None


def prompt_format(student: Student) -> dict[str, Any]:
    """The student's signature where it is not the shipped `StudentStep` (changed instructions or field texts):
    rows written in one format must not be resumed or shared (`bc_from`) into a run that prompts in another."""
    def described(signature: type[dspy.Signature]) -> dict[str, Any]:
        return {"instructions": signature.instructions,
                "fields": {name: [(f.json_schema_extra or {}).get("prefix"), (f.json_schema_extra or {}).get("desc")]
                           for name, f in signature.fields.items()}}

    mine = described(student.step.signature)
    return {} if mine == described(StudentStep) else {"signature": mine}
