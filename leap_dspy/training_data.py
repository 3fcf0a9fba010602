"""Corrections into training rows, formatted by the adapter the student runs with.

Rows are built from the student's signature and the student's own inputs at the corrected state. The
privileged state is not an argument of anything here: there is no path by which it reaches a student prompt.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import dspy

from leap_dspy.envs.base import action_admissible
from leap_dspy.progress import console
from leap_dspy.types import Correction, StudentInputs, Trajectory

Messages = list[dict[str, str]]


@dataclasses.dataclass
class AnswerFit:
    """The tokens the student may write (`max_new_tokens`). An answer over it is cut off at play time before its
    action, so the student would learn a step it can never take: a long reason (an LM expert's runs on) is cut,
    at a word, until the answer fits. The corrections keep the whole reason; only the rows are cut."""

    count: Callable[[str], int]
    limit: int
    cut: int = 0
    over: int = 0  # answers whose action alone does not fit

    @classmethod
    def of(cls, model: str, limit: int) -> AnswerFit:
        from leap_dspy.lm.models import load_tokenizer

        tokenizer = load_tokenizer(model)
        return cls(lambda text: len(tokenizer(text)["input_ids"]), limit)

    def reason(self, render: Callable[[str], str], reason: str) -> str:
        """`reason`, or its longest beginning, cut after a word (within a word where none fits), with which
        `render(reason)` fits."""
        if self.count(render(reason)) <= self.limit:
            return reason
        if self.count(render("")) > self.limit:
            self.over += 1
            return reason
        ends = [m.end() for m in re.finditer(r"\S+", reason)][:-1]
        if not ends or self.count(render(reason[:ends[0]])) > self.limit:
            ends = list(range(1, ends[0] if ends else len(reason)))  # no whole word fits: a character at a time
        fits, top = 0, len(ends)  # the most cut points that fit, by bisection: a render and a count each try
        while fits < top:
            mid = (fits + top + 1) // 2
            fits, top = (mid, top) if self.count(render(reason[:ends[mid - 1]])) <= self.limit else (fits, mid - 1)
        self.cut += 1
        return reason[:ends[fits - 1]] if fits else ""

    def say(self, rows: int, stage: str) -> dict[str, int]:
        """Say what building `rows` rows cut, and start counting anew; the counts, for the stage's train.json."""
        if self.cut:
            console.print(f"[yellow]{stage}: {self.cut} of {rows} training answers were longer than "
                          f"max_new_tokens={self.limit}; their reasons were cut to fit[/yellow]")
        if self.over:
            console.print(f"[yellow]{stage}: {self.over} of {rows} training answers are longer than "
                          f"max_new_tokens={self.limit} with no reason at all: the student will be cut off before "
                          "their action; raise the limit (LEAP(lm={'max_new_tokens': ...}), "
                          "TextEnv.answer_tokens)[/yellow]")
        counts = {"answers_cut": self.cut, "answers_over_budget": self.over}
        self.cut = self.over = 0
        return counts


def _prompt_and_completion(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                           inputs: StudentInputs | dict[str, Any], reason: str, action: str,
                           demos: list[Any] | None = None, fit: AnswerFit | None = None
                           ) -> tuple[Messages, Messages]:
    """The prompt the student's predictor sends (its few-shot `demos` included, as DSPy's BootstrapFinetune
    formats them) and the answer, its reason cut to `fit` the student's answer budget."""
    reason = _fitted(signature, adapter, reason, action, fit)
    values = inputs.model_dump() if isinstance(inputs, StudentInputs) else inputs
    data = adapter.format_finetune_data(signature=signature, demos=list(demos or []), inputs=values,
                                        outputs={"reason": reason, "action": action})
    messages = data["messages"]
    return messages[:-1], messages[-1:]


def _fitted(signature: type[dspy.Signature], adapter: dspy.ChatAdapter, reason: str, action: str,
            fit: AnswerFit | None) -> str:
    if fit is None:
        return reason
    return fit.reason(lambda r: adapter.format_assistant_message_content(
        signature=signature, outputs={"reason": r, "action": action}), reason)


def sft_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter, corrections: Iterable[Correction],
             demos: list[Any] | None = None, fit: AnswerFit | None = None) -> list[dict[str, Any]]:
    """Conversational prompt-completion rows, TRL's format for completion-only SFT."""
    rows = []
    for c in corrections:
        prompt, completion = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action, demos, fit)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def preference_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                    corrections: Iterable[Correction], kind: str = "dpo",
                    anchors: Iterable[Correction] = (), demos: list[Any] | None = None,
                    fit: AnswerFit | None = None) -> list[dict[str, Any]]:
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
        prompt, chosen = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action, demos, fit)
        _, rejected = _prompt_and_completion(signature, adapter, c.inputs, c.student_reason or "",
                                             c.student_action or "", demos)
        if kind == "dpo":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"prompt": prompt, "completion": chosen, "label": True})
            rows.append({"prompt": prompt, "completion": rejected, "label": False})
    for c in anchors:
        prompt, chosen = _prompt_and_completion(signature, adapter, c.inputs, c.reason, c.action, demos, fit)
        if kind == "dpo":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": chosen, "anchor": True})
        else:
            rows.append({"prompt": prompt, "completion": chosen, "label": True})
    return rows


def privileged_self_rows(signature: type[dspy.Signature], adapter: dspy.ChatAdapter,
                         demonstrations: Iterable[Trajectory], budget: int, rng: random.Random,
                         propose_reason: Any, idle_actions: tuple[str, ...] = (),
                         fit: AnswerFit | None = None) -> list[dict[str, Any]]:
    """Rows that teach the student's weights to act as its own privileged expert, from demonstrations whose
    steps recorded the privileged state (`expert_rollout(record_level=...)`): the student's inputs and the
    privileged state, completed by the demonstrated step.

    Where `signature` also reads a proposed step to judge (`PrivilegedCorrection`), half the rows propose the
    demonstrated step itself, which the expert keeps; the other half propose another admissible action (with a
    plausible reason from `propose_reason(task, observation, action, history)`), which it replaces by the
    demonstrated step. A student never trained on this format ignores the privileged facts and repeats it.
    """
    steps = [s for t in demonstrations if t.success for s in t.steps
             if s.privileged is not None and s.error is None and s.action and s.valid
             and action_admissible(s.action, s.admissible_actions)]
    rng.shuffle(steps)
    judges = "student_action" in signature.input_fields
    rows = []
    for step in steps[:budget]:
        inputs = step.inputs
        values = {**inputs.model_dump(), "privileged_state": step.privileged.to_text()}
        reason = _fitted(signature, adapter, step.reason, step.action, fit)  # a proposal of the step says it too
        if judges:
            others = [a for a in step.admissible_actions or [] if a != step.action and a not in idle_actions]
            proposed, proposed_reason = step.action, reason
            if others and rng.random() < 0.5:
                proposed = rng.choice(others)
                proposed_reason = propose_reason(inputs.task, inputs.observation, proposed, inputs.history)
            values.update(student_reason=proposed_reason, student_action=proposed)
        prompt, completion = _prompt_and_completion(signature, adapter, values, reason, step.action)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


# -- DAgger's aggregate, bounded ------------------------------------------------------------------------------

def aggregate_sft(current: list[Correction], earlier: list[Correction], budget: int, rng: random.Random,
                  balance: int, balance_rng: random.Random, all_new: bool = True) -> list[Correction]:
    """A round's SFT records, as DAgger aggregates them: every one of this round's corrections (the student's
    newest mistakes; the rows grow past `budget` when there are more), then earlier data (demonstrations
    included) sampled to fill up, so that what the student already did right is not forgotten. `all_new`
    False caps this round's share at half the budget instead. With no earlier data it is behaviour cloning's
    demonstrations alone."""
    chosen = list(current)
    rng.shuffle(chosen)
    if earlier and not all_new:
        chosen = chosen[: max(budget // 2, budget - len(earlier))]
    keep = list(chosen) if earlier else []  # a copy: the fill below extends `chosen`
    earlier = list(earlier)
    rng.shuffle(earlier)
    chosen += earlier[: max(0, budget - len(chosen))]
    return balance_by_action(chosen, balance, max(budget, len(keep)), balance_rng, keep=keep)


def aggregate_preference(current: list[Correction], earlier: list[Correction], right: list[Correction],
                         budget: int, anchor_share: float, kind: str, rng: random.Random, balance: int,
                         balance_rng: random.Random, all_new: bool = True) -> tuple[list[Correction], list[Correction]]:
    """A preference round's (pairs, anchors): pairs where the expert changed the student's step (this round's
    first, earlier rounds' to fill up) and anchors, steps known to be right (`right`), trained toward; as many
    anchor rows as pair rows at most, so that the anchors keep the pairs' signal from drowning. `all_new`
    keeps every pair of this round even past the budget, as DAgger does."""
    per_pair = 2 if kind == "kto" else 1  # KTO trains the two sides of a pair as two rows
    n_anchor = round(budget * anchor_share)
    pairs = [c for c in current if c.changed]
    rng.shuffle(pairs)
    older = [c for c in earlier if c.changed]
    rng.shuffle(older)
    pairs = (pairs + older)[: max((budget - n_anchor) // per_pair, len(pairs) if all_new else 0)]
    if not n_anchor:
        return pairs, []
    right = list(right)
    rng.shuffle(right)
    return pairs, balance_by_action(right, balance, min(n_anchor, len(pairs) * per_pair), balance_rng)


def balance_by_action(records: list[Correction], cap: int, budget: int, rng: random.Random,
                      keep: list[Correction] = ()) -> list[Correction]:
    """At most `budget` records, in which rarer kinds of action (the action's first word) are repeated up to
    `cap` times (count of the commonest kind / count of this kind, rounded); each record of `keep` stays at
    least once.

    An agent's data is mostly one kind of step (moving on) and its hardest decisions are rare ones (taking
    what the task needs, once per episode): trained on the raw mix, a small student's rare-decision token
    stays near its prior and greedy decoding never picks it. `cap` 1 keeps the raw mix.
    """
    if cap > 1 and records:
        kinds = Counter(_action_kind(r) for r in records)
        top = max(kinds.values())
        records = [r for r in records for _ in range(min(cap, max(1, round(top / kinds[_action_kind(r)]))))]
    if len(records) <= budget:
        return records
    kept, rest, pending = [], [], {id(r) for r in keep}
    for record in records:
        if id(record) in pending:
            pending.discard(id(record))
            kept.append(record)
        else:
            rest.append(record)
    return kept + rng.sample(rest, max(0, budget - len(kept)))


def _action_kind(record: Correction) -> str:
    return (record.action.split() or [""])[0].split("[")[0].lower()
