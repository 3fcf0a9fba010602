"""Corrections into training rows, formatted by the adapter the student runs with.

Rows are built from the student's signature and the student's own inputs at the corrected state. The
privileged state is not an argument of anything here: there is no path by which it reaches a student prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import dspy

from leap_dspy.types import Correction, StudentInputs, Trajectory

Messages = list[dict[str, str]]


def _prompt_and_completion(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                           inputs: StudentInputs | dict[str, Any], reason: str, action: str
                           ) -> tuple[Messages, Messages]:
    values = inputs.model_dump() if isinstance(inputs, StudentInputs) else inputs
    data = adapter.format_finetune_data(signature=signature, demos=[], inputs=values,
                                        outputs={"reason": reason, "action": action})
    messages = data["messages"]
    return messages[:-1], messages[-1:]


def sft_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
             corrections: Iterable[Correction]) -> list[dict[str, Any]]:
    """Conversational prompt-completion rows, TRL's format for completion-only SFT."""
    rows = []
    for c in corrections:
        prompt, completion = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def preference_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                    corrections: Iterable[Correction], kind: str = "dpo",
                    anchors: Iterable[Correction] = ()) -> list[dict[str, Any]]:
    """The correction preferred over the student's own step. Steps the expert left unchanged make no pair;
    for KTO each changed step gives one desirable and one undesirable row.

    `anchors` are steps known to be right, trained toward without a rejected side: for KTO a desirable row;
    for DPO a pair whose chosen and rejected are the same step, marked `"anchor": True`. Such a pair adds
    nothing to the DPO term (the two log-ratios are equal, so their gradients cancel exactly) and is trained
    by the NLL term that `train_dpo` adds when any row is an anchor.
    """
    if kind not in ("dpo", "kto"):
        raise ValueError(f"preference kind must be dpo or kto, not {kind!r}")
    rows: list[dict[str, Any]] = []
    for c in corrections:
        if not c.changed:
            continue
        prompt, chosen = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action)
        _, rejected = _prompt_and_completion(signature, adapter, c.inputs, c.student_reason or "",
                                             c.student_action or "")
        if kind == "dpo":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"prompt": prompt, "completion": chosen, "label": True})
            rows.append({"prompt": prompt, "completion": rejected, "label": False})
    for c in anchors:
        prompt, chosen = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action)
        if kind == "dpo":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": chosen, "anchor": True})
        else:
            rows.append({"prompt": prompt, "completion": chosen, "label": True})
    return rows


def privileged_self_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                         demonstrations: Iterable[Trajectory], budget: int, rng: random.Random,
                         propose_reason: Any, idle_actions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows that teach the student's weights to act as its own privileged expert, from demonstrations whose
    steps recorded the privileged state (`expert_rollout(record_level=...)`).

    The expert's prompt holds a proposed step to judge. Half the rows propose the demonstrated step itself,
    which the expert keeps; the other half propose another admissible action (with a plausible reason from
    `propose_reason(task, observation, action, history)`), which it replaces by the demonstrated step. A
    student never trained on this format ignores the privileged facts and repeats the proposal (measured on
    ALFWorld: 5 of 252 steps changed, 99 corrections not admissible).
    """
    steps = [s for t in demonstrations if t.success for s in t.steps
             if s.privileged is not None and s.error is None and s.action]
    rng.shuffle(steps)
    rows = []
    for step in steps[:budget]:
        others = [a for a in step.admissible_actions or [] if a != step.action and a not in idle_actions]
        inputs = step.inputs
        if others and rng.random() < 0.5:
            proposed = rng.choice(others)
            proposed_reason = propose_reason(inputs.task, inputs.observation, proposed, inputs.history)
        else:
            proposed, proposed_reason = step.action, step.reason
        values = {**inputs.model_dump(), "student_reason": proposed_reason, "student_action": proposed,
                  "privileged_state": step.privileged.to_text()}
        prompt, completion = _prompt_and_completion(signature, adapter, values, step.reason, step.action)
        rows.append({"prompt": prompt, "completion": completion})
    return rows
