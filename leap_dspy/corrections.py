"""Privileged corrections: the expert's reason and action at every state the student visited, one record each.

Records are judged as they are made (an action the environment would not admit, a reason that names what the
student never saw, an action only privileged facts justify) and saved the moment they exist, so that a killed
round resumes without asking the expert twice. An expert failure is retried, then recorded, never raised
here; the round stops once every step was asked if the endpoint gave no answer at all (`unanswered`).
"""

from __future__ import annotations

import contextvars
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import dspy

from leap_dspy.envs.base import action_admissible
from leap_dspy.envs.expertise import Expertise
from leap_dspy.metrics import describe_expert
from leap_dspy.programs.experts import expert_inputs
from leap_dspy.progress import progress_bar
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import NoAnswer, ask_billed, expert_failed, needs_oracle, unreachable, wants_text
from leap_dspy.signatures import StudentTurn
from leap_dspy.store import JsonlLog
from leap_dspy.types import Correction, ExpertUsage, Step, Trajectory


def demonstration_records(demos: Iterable[Trajectory], log: JsonlLog[Correction], level: int,
                          expertise: Expertise, successful_only: bool = True, drop_unrealizable: bool = False) -> None:
    """The demonstrator's own steps as records of iteration 0 (behaviour cloning's data), judged like any
    correction so that an unrealizable demonstration is flagged (and with `drop_unrealizable`, dropped) too."""
    have = log.load()
    for trajectory in demos:
        if successful_only and not trajectory.success:
            continue
        for step in trajectory.steps:
            if f"0:{trajectory.task.id}:{step.index}" in have:  # logged before a resume: judged already
                continue
            judged = realizability(step, step.reason, step.action, expertise)
            dropped = step.error or (None if action_admissible(step.action, step.admissible_actions) else
                                     f"demonstrated action not admissible: {step.action[:80]}")
            dropped = dropped or (None if step.valid else f"the environment rejected the demonstrated action: "
                                                          f"{step.action[:80]}")
            record = Correction(task_id=trajectory.task.id, step=step.index, inputs=step.inputs, reason=step.reason,
                                action=step.action, student_reason=step.reason, student_action=step.action,
                                expert=trajectory.policy, iteration=0, level=level, source="demonstration",
                                dropped=dropped or (unrealizable(judged) if drop_unrealizable else None), **judged)
            log.append(record)


class NoDemonstrations(RuntimeError):
    """Behaviour cloning has not one usable row: nothing the student could be trained on."""


def nothing_to_clone(demos: dict[str, Trajectory], records: list[Correction], successful_only: bool) -> str:
    """Why behaviour cloning got no rows, in one message: how many demonstrations were won, why steps dropped."""
    won = sum(t.success for t in demos.values())
    why = Counter(c.dropped for c in records if c.dropped)
    message = f"behaviour cloning has no training rows: the demonstrator won {won} of {len(demos)} training tasks"
    if successful_only and not won:
        message += " (only won episodes are demonstrations; bc_successful_only=false keeps the others)"
    if why:
        message += "; steps dropped: " + "; ".join(f"{n} x {reason}" for reason, n in why.most_common(3))
    ended = Counter(t.error.split(": ", 1)[-1].splitlines()[0][:200] for t in demos.values() if t.error)
    if ended:  # the expert's failures and the environment's, each of which ends its episode
        message += "; demonstrations ended early: " + "; ".join(f"{n} x {e}" for e, n in ended.most_common(2))
    return message


def few_won(demos: dict[str, Trajectory], successful_only: bool) -> str | None:
    """A warning where the demonstrator lost most training tasks (a scripted expertise with a bug, an LM expert
    out of its depth): its run would otherwise look like any other in metrics.csv. None where it won half or
    more, or none at all where only won episodes count (`nothing_to_clone` says that)."""
    won, played = sum(t.success for t in demos.values()), len(demos)
    if 2 * won >= played or (successful_only and not won):
        return None
    kept = ("; behaviour cloning keeps won episodes only (bc_successful_only), so it trains on those"
            if successful_only else "; behaviour cloning trains on lost episodes too (bc_successful_only is off)")
    return f"the demonstrator won {won} of {played} training tasks{kept} (its episodes: iter_0/trajectories.jsonl)"


def unrealizable(judged: dict[str, Any]) -> str | None:
    """Why a judged record is not realizable, as its `dropped` note, or None."""
    if judged["unobserved"]:
        return f"reason not realizable: mentions {', '.join(judged['unobserved'][:3])}"
    return f"action not realizable: {judged['unjustified']}" if judged["unjustified"] else None


def realizability(step: Step, reason: str, action: str, expertise: Expertise) -> dict[str, Any]:
    """What a correction's reason names that the student never saw, and why its action is one only the
    privileged state justifies (judged against what was captured for the expert at that step)."""
    privileged = step.privileged
    unjustified = expertise.unjustified(step.inputs, privileged, action) if privileged is not None and action \
        else None
    unobserved = unobserved_mentions(reason, step.inputs, privileged, action, known=expertise.vocabulary)
    return {"unobserved": unobserved, "unjustified": unjustified}


class Corrector:
    """Asks one expert about the steps of round `k`, with retries, and turns each answer into a judged record."""

    def __init__(self, teacher: dspy.Module, k: int, level: int, expertise: Expertise, retries: int = 3,
                 drop_unrealizable: bool = False) -> None:
        self.teacher, self.k, self.level, self.expertise = teacher, k, level, expertise
        self.retries, self.drop_unrealizable = retries, drop_unrealizable
        self.name = describe_expert(teacher)["name"]
        self.uses_lm = not needs_oracle(teacher)
        self.per_trajectory = getattr(teacher, "per", "step") == "trajectory"
        self.unanswered: list[str] = []
        """Calls the endpoint never answered (down, timing out, refusing the key): the round must not train
        without them, since a finished round is never asked again."""

    def record(self, trajectory: Trajectory, step: Step, **fields: Any) -> Correction:
        return Correction(task_id=trajectory.task.id, step=step.index, inputs=step.inputs,
                          student_reason=step.reason, student_action=step.action, expert=self.name,
                          level=self.level, iteration=self.k, **{"reason": "", "action": "", **fields})

    def judged(self, trajectory: Trajectory, step: Step, reason: str, action: str,
               usage: ExpertUsage | None) -> Correction:
        action = (action.strip().splitlines() or [""])[0].strip()
        reason = reason.strip()
        judged = realizability(step, reason, action, self.expertise)
        dropped = None
        if not action:
            dropped = "expert gave no action"
        elif not action_admissible(action, step.admissible_actions):
            dropped = f"expert action not admissible: {action[:80]}"
        elif self.drop_unrealizable:
            dropped = unrealizable(judged)
        return self.record(trajectory, step, reason=reason, action=action, dropped=dropped, usage=usage, **judged)

    def ask(self, call: Callable[[], Any]) -> tuple[Any, ExpertUsage | None, str | None]:
        """`call()` retried as any expert call is (`ask_billed`): (answer, what the attempts cost, the last
        error), the failure recorded rather than raised."""
        spent: list[ExpertUsage] = []

        def bill() -> ExpertUsage | None:
            return sum(spent, ExpertUsage()) if self.uses_lm else None

        try:
            return ask_billed(call, self.retries, spent), bill(), None
        except NoAnswer as exc:
            return None, bill(), str(exc)
        except Exception as exc:  # any expert failure, after its retries
            error = expert_failed(exc)
            if unreachable(exc):
                self.unanswered.append(error)
            return None, bill(), error

    def __call__(self, job: tuple[Trajectory, list[Step]]) -> list[Correction]:
        trajectory, steps = job
        if steps[0].privileged is None:
            return [self.record(trajectory, s, dropped="no privileged state was captured") for s in steps]
        if self.per_trajectory:
            return self._whole(trajectory, steps)
        step = steps[0]
        out, usage, error = self.ask(lambda: self.teacher(**expert_inputs(step.inputs, step.reason, step.action,
                                                                          step.privileged, wants_text(self.teacher))))
        if out is None:
            return [self.record(trajectory, step, dropped=error, usage=usage)]
        return [self.judged(trajectory, step, str(out.reason), str(out.action), usage)]

    def _whole(self, trajectory: Trajectory, steps: list[Step]) -> list[Correction]:
        """One call for the trajectory's pending steps; its cost is booked on the first record."""
        turns = [StudentTurn(step=s.index, observation=s.inputs.observation, student_reason=s.reason,
                             student_action=s.action) for s in steps]
        fixes, usage, error = self.ask(lambda: self.teacher.correct_trajectory(
            trajectory.task.instruction, turns, steps[0].privileged))
        shares = [usage if i == 0 else ExpertUsage() for i in range(len(steps))]
        if fixes is None:
            return [self.record(trajectory, s, dropped=error, usage=u) for s, u in zip(steps, shares, strict=True)]
        by_step = {fix.step: fix for fix in fixes}
        return [self.judged(trajectory, s, by_step[s.index].reason, by_step[s.index].action, u)
                if s.index in by_step else self.record(trajectory, s, usage=u,
                                                       dropped="expert gave no correction for this step")
                for s, u in zip(steps, shares, strict=True)]


def _settled(record: Correction | None) -> bool:
    """A record that needs no new call: any but a failed expert call's."""
    return record is not None and not (record.dropped or "").startswith("expert failed:")


def collect_corrections(corrector: Corrector, trajectories: dict[str, Trajectory], log: JsonlLog[Correction],
                        threads: int, progress: bool = True) -> list[Correction]:
    """Ask about every visited step not yet in `log` (one call per step, or per trajectory), saving each record
    as soon as its call returns; returns the round's records."""
    have = log.load()
    k = corrector.k
    # A step whose expert call failed (an outage, a cut connection) is asked again on resume: its new record
    # replaces the failure (the log keeps the last record of a key), with both attempts' usage.
    pending = [(t, [s for s in t.steps if not _settled(have.get(f"{k}:{t.task.id}:{s.index}"))])
               for t in trajectories.values()]
    if corrector.per_trajectory:
        # A trajectory cut short by a kill is asked whole again: the call an uninterrupted run made (the cache
        # answers it), so the expert sees the same context; only its missing records are kept.
        jobs = [(t, list(t.steps)) for t, steps in pending if steps]
    else:
        jobs = [(t, [s]) for t, steps in pending for s in steps]
    if jobs:
        context = contextvars.copy_context()  # dspy.context settings live in contextvars: carry them over
        total = sum(len(steps) for _, steps in pending)
        with progress_bar(f"iteration {k}: corrections", total, progress) as advance, \
                ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(context.copy().run, corrector, job) for job in jobs]
            for future in as_completed(futures):
                for correction in future.result():
                    old = have.get(correction.key)
                    if _settled(old):
                        continue
                    if old is not None and old.usage is not None and correction.usage is not None:
                        correction.usage = old.usage + correction.usage
                    log.append(correction)
                    have[correction.key] = correction
                    advance()
    return [c for c in have.values() if c.iteration == k]
