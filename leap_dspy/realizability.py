"""A check that an expert's reason speaks only of what the student could observe.

LEAP's expert sees privileged facts; a correction is useful to imitate only if the student, from its own
inputs, could have written it. The check judges a reason against the privileged state's own sections: a term
of a privileged fact (a numbered name, a path, an id, a content word) that the student's inputs never showed
is a leak, and so is a fact whose terms the reason states together while no line the student saw does (the
"apple 1 is in fridge 1" that the `Actions:` line, naming every place, would otherwise let through). Names
in the reason that look like things (numbered entities, product ids, quoted strings) and that the student
never saw are flagged even without a privileged state. Matching is by whole words throughout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from leap_dspy.types import PrivilegedState, StudentInputs

_WORD = re.compile(r"[A-Za-z0-9_*]+(?:[.\-/][A-Za-z0-9_*]+)*")
_STOP = frozenset((
    "a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "by", "for", "with", "from", "into", "onto",
    "is", "are", "was", "be", "it", "its", "this", "that", "these", "those", "i", "you", "we", "he", "she",
    "they", "not", "no", "yes", "do", "does", "done", "go", "get", "put", "take", "use", "open", "close",
    "look", "find", "see", "seen", "need", "what", "which", "where", "there", "here", "then", "than", "now",
    "one", "some", "all", "any", "more", "most", "each", "other", "same", "so", "as", "if", "in/on", "has",
    "have", "had", "will", "would", "can", "could", "should", "must", "let", "me", "my", "your", "our",
    "their", "them", "his", "her", "only", "also", "just", "very", "next", "first", "last", "step", "steps",
    "task", "item", "items", "line", "lines", "page", "row", "rows", "column", "columns",
))
ACTIONS_PREFIX = "Actions:"
"""How the student's observation lists the admissible actions (`Student`)."""
_ENTITY = re.compile(r"\b([a-z][a-z]+) (\d+)\b(?![.,]\d)")
_QUOTED = re.compile(r"['\"`]([^'\"`]{3,60})['\"`]")
_PRODUCT_ID = re.compile(r"\b(B0[0-9A-Z]{8})\b")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; paths, dotted names and globs stay whole (`/testbed/a.py`, `t1.name`)."""
    return [w.lower() for w in _WORD.findall(text)]


def _parts(token: str) -> list[str]:
    """The pieces of a compound token that can be named alone: a path's folders, a qualified column's name."""
    if not any(sep in token for sep in "./"):
        return []
    return [p for p in re.split(r"[./]", token) if len(p) >= 3 and p not in _STOP and not p.isdigit()]


def _terms(text: str) -> list[str]:
    """The terms of a fact: numbered names ("fridge 1") and content words, in order, without repeats."""
    tokens = words(text)
    out: list[str] = []
    skip = False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
            continue
        if i + 1 < len(tokens) and tokens[i + 1].isdigit() and token not in _STOP and not token.isdigit():
            term, skip = f"{token} {tokens[i + 1]}", True
        elif token in _STOP or (len(token) < 3 and not any(c.isdigit() for c in token)):
            continue
        else:
            term = token
        for piece in [term, *_parts(term)]:
            if piece not in out:
                out.append(piece)
    return out


def _facts(privileged: PrivilegedState) -> list[str]:
    lines = []
    for body in privileged.sections.values():
        for item in [body] if isinstance(body, str) else body:
            lines.extend(line.strip(" -") for line in item.splitlines() if line.strip(" -"))
    if privileged.oracle_action:
        lines.append(privileged.oracle_action)
    return lines


def _has(term: str, text: str) -> bool:
    """Whether `term` occurs in the word-normalised `text` as whole words."""
    return re.search(rf"(?<![\w./*-]){re.escape(term)}(?![\w/*-]|\.\w)", text) is not None


def _normal(text: str) -> str:
    """`text` as its words, each compound followed by its pieces, so that a piece seen counts as seen."""
    return " ".join(piece for w in words(text) for piece in [w, *_parts(w)])


def privileged_mentions(text: str, inputs: StudentInputs, privileged: PrivilegedState | None,
                        also_seen: Iterable[str] = (), known: Iterable[str] = (), facts: bool = True) -> list[str]:
    """What `text` states of the privileged state that the student never saw: single terms it was never
    shown, then (with `facts`) whole facts of two or more terms that no line of its inputs states together.

    `known` are words the student knows without being shown them (an environment's action grammar and
    keywords, `Expertise.vocabulary`): a privileged fact may use them, and so may the student.
    """
    if privileged is None:
        return []
    known = {word.lower() for word in known}
    shown = [inputs.task, inputs.observation, inputs.history, *also_seen]
    lines = [line for block in shown for line in block.splitlines()]
    seen_lines = [_normal(line) for line in lines]
    # A list of what can be done names things side by side without stating any fact about them.
    stating = [_normal(line) for line in lines if not line.lstrip().startswith(ACTIONS_PREFIX)]
    seen = " ".join(seen_lines)
    said = _normal(text)
    found: list[str] = []
    for fact in _facts(privileged):
        terms = _terms(fact)
        for term in terms:
            if term not in known and _has(term, said) and not _has(term, seen) and term not in found:
                found.append(term)
        if not facts:
            continue
        stated = len(terms) >= 2 and all(_has(t, said) for t in terms)
        if stated and not any(all(_has(t, line) for t in terms) for line in stating) and fact not in found \
                and not all(t in found for t in terms):
            found.append(fact)
    return found


def unobserved_mentions(reason: str, inputs: StudentInputs, privileged: PrivilegedState | None = None,
                        action: str = "", known: Iterable[str] = ()) -> list[str]:
    """The things `reason` names that the student never saw.

    The action the reason explains counts as seen (a reason may name its own action; whether the action is
    one the student could have chosen is a separate question, `Expertise.unjustified`).
    """
    shown = "\n".join((inputs.task, inputs.observation, inputs.history, action))
    seen = _normal(shown)
    found: list[str] = []
    for name, number in _ENTITY.findall(reason.lower()):
        mention = f"{name} {number}"
        if name not in _STOP and not _has(mention, seen) and mention not in found:
            found.append(mention)
    for quoted in _QUOTED.findall(reason) + _PRODUCT_ID.findall(reason):
        if not _has(_normal(quoted), seen) and quoted not in found:
            found.append(quoted)
    for mention in privileged_mentions(reason, inputs, privileged, also_seen=[action], known=known):
        if mention not in found:
            found.append(mention)
    return found
