"""Corrections into training rows, formatted by the adapter the student runs with.

Rows are built from the student's signature and the student's own inputs at the corrected state. The
privileged state is not an argument of anything here: there is no path by which it reaches a student prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dspy

from leap_dspy.types import Correction, StudentInputs

Messages = list[dict[str, str]]


def _prompt_and_completion(signature: type[dspy.Signature], adapter: dspy.ChatAdapter, inputs: StudentInputs,
                           reason: str, action: str) -> tuple[Messages, Messages]:
    data = adapter.format_finetune_data(signature=signature, demos=[], inputs=inputs.model_dump(),
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
                    corrections: Iterable[Correction], kind: str = "dpo") -> list[dict[str, Any]]:
    """The correction preferred over the student's own step. Steps the expert left unchanged make no pair;
    for KTO each changed step gives one desirable and one undesirable row."""
    rows: list[dict[str, Any]] = []
    for c in corrections:
        if not c.changed:
            continue
        prompt, chosen = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action)
        _, rejected = _prompt_and_completion(signature, adapter, c.inputs, c.student_reason or "",
                                             c.student_action or "")
        if kind == "dpo":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif kind == "kto":
            rows.append({"prompt": prompt, "completion": chosen, "label": True})
            rows.append({"prompt": prompt, "completion": rejected, "label": False})
        else:
            raise ValueError(f"preference kind must be dpo or kto, not {kind!r}")
    return rows
