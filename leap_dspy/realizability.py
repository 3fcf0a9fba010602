"""A check that an expert's reason speaks only of what the student could observe.

LEAP's expert sees privileged facts; a correction is useful to imitate only if the student, from its own
inputs, could have written it. The check is deliberately simple and explainable: it finds the concrete
things a reason names — numbered entities ("apple 1", "cabinet 3"), bracketed buttons, quoted strings,
product ids — and flags those that appear nowhere in the student's task, observation or history.
"""

from __future__ import annotations

import re

from leap_dspy.types import StudentInputs

_ENTITY = re.compile(r"\b([a-z][a-z]+) (\d+)\b")
_QUOTED = re.compile(r"['\"`]([^'\"`]{3,60})['\"`]")
_PRODUCT_ID = re.compile(r"\b(B0[0-9A-Z]{8})\b")
_GENERIC = {"step", "steps", "line", "lines", "row", "rows", "column", "item", "items", "page", "the", "a",
            "an", "at", "in", "on", "of", "to", "and", "or", "with", "for", "than", "from"}


def unobserved_mentions(reason: str, inputs: StudentInputs) -> list[str]:
    """The things `reason` names that the student never saw."""
    seen = "\n".join((inputs.task, inputs.observation, inputs.history)).lower()
    found: list[str] = []
    text = reason.lower()
    for name, number in _ENTITY.findall(text):
        if name in _GENERIC:
            continue
        mention = f"{name} {number}"
        if mention not in seen and mention not in found:
            found.append(mention)
    for quoted in _QUOTED.findall(reason):
        if quoted.lower() not in seen and quoted not in found:
            found.append(quoted)
    for product in _PRODUCT_ID.findall(reason):
        if product.lower() not in seen and product not in found:
            found.append(product)
    return found


def is_realizable(reason: str, inputs: StudentInputs) -> bool:
    return not unobserved_mentions(reason, inputs)
