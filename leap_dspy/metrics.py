"""What a run measures beyond success: per-split metrics of a set of episodes, and what an LM expert cost.

Costs come from the correction records themselves, so a resumed run still counts every call it paid for.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import dspy

from leap_dspy.types import Correction, ExpertUsage, Trajectory


def success_rate(trajectories: list[Trajectory]) -> float:
    return sum(t.success for t in trajectories) / len(trajectories) if trajectories else 0.0


def mean_reward(trajectories: list[Trajectory]) -> float:
    return sum(t.reward for t in trajectories) / len(trajectories) if trajectories else 0.0


def split_metrics(trajectories: list[Trajectory]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for split in ("train", "seen", "unseen"):
        group = [t for t in trajectories if t.task.split == split]
        if not group:
            continue
        metrics[f"{split}_success"] = success_rate(group)
        metrics[f"{split}_score"] = 100.0 * mean_reward(group)
        metrics[f"{split}_episodes"] = len(group)
        metrics[f"{split}_steps"] = sum(len(t.steps) for t in group) / len(group)
    metrics["parse_errors"] = sum(t.num_errors for t in trajectories)
    metrics["snapped_actions"] = sum(t.num_snapped for t in trajectories)
    metrics |= expert_usage_metrics([], trajectories)  # the expert's reference row, where an LM plays it
    if failed := sum(t.error is not None and not t.policy_failed for t in trajectories):
        metrics["environment_failures"] = failed  # episodes the environment's own code ended (`Trajectory.error`)
    return metrics


def call_usage(tracker: Any, failed: bool = False) -> ExpertUsage:
    """One expert call as `dspy.track_usage` saw it: a call that billed no tokens was served from the cache,
    unless it `failed` without an answer (an HTTP error or a timeout bills nothing either, and is no cache hit)."""
    prompt = completion = 0
    cost: float | None = None
    for model, entries in tracker.usage_data.items():
        for entry in entries:
            p, c = int(entry.get("prompt_tokens") or 0), int(entry.get("completion_tokens") or 0)
            prompt, completion = prompt + p, completion + c
            price = token_cost_usd(model, p, c)
            if price is not None:
                cost = (cost or 0.0) + price
    billed = bool(tracker.usage_data) and (prompt or completion)
    return ExpertUsage(calls=1, cached=0 if billed or failed else 1, prompt_tokens=prompt,
                       completion_tokens=completion, cost_usd=cost)


@functools.cache
def _litellm() -> Any:
    import litellm

    return litellm


def token_cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """LiteLLM's price for these tokens on `model`, or None for a model it has no price for (a local one)."""
    if model.startswith("local/"):
        return None
    try:
        prompt_cost, completion_cost = _litellm().cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    except Exception:  # unknown model or provider: no price, not an error
        return None
    return float(prompt_cost + completion_cost)


def expert_usage_metrics(corrections: list[Correction], trajectories: Iterable[Trajectory] = ()) -> dict[str, Any]:
    """A stage's expert bill, from the records that keep it (so a resumed run still counts every call): its
    corrections, and the steps of episodes the expert played itself."""
    usages = [c.usage for c in corrections if c.usage is not None]
    usages += [s.expert_usage for t in trajectories for s in t.steps if s.expert_usage is not None]
    if not usages:
        return {}
    total = sum(usages, ExpertUsage())
    return {"expert_calls": total.calls, "expert_cached_calls": total.cached,
            "expert_prompt_tokens": total.prompt_tokens, "expert_completion_tokens": total.completion_tokens,
            "expert_tokens": total.prompt_tokens + total.completion_tokens,
            "expert_cost_usd": round(total.cost_usd, 6) if total.cost_usd is not None else None}


def describe_expert(teacher: dspy.Module) -> dict[str, Any]:
    """What the config records about the expert: its class and, for LM experts, the model."""
    info: dict[str, Any] = {"name": type(teacher).__name__}
    predictors = teacher.predictors() if hasattr(teacher, "predictors") else []  # a plain function: none
    lms = [p.lm for p in predictors if getattr(p, "lm", None) is not None]
    if not isinstance(teacher, dspy.Module):
        info["name"] = getattr(teacher, "__qualname__", info["name"])
    if lms:
        info["model"] = getattr(lms[0], "model", str(lms[0]))
    if getattr(teacher, "per", "step") != "step":
        info["per"] = teacher.per
    if getattr(teacher, "sees_student", False):  # another prompt format for the self, and its behaviour cloning
        info["sees_student"] = True
    if getattr(teacher, "given_expertise", False):  # not the environment's own: other corrections
        info["expertise"] = type(teacher.expertise).__name__
    return info


def round_metrics(current: list[Correction], trajectories: dict[str, Trajectory], examples: int,
                  train_s: float) -> dict[str, Any]:
    """What a stage's metrics add to its evaluation: its data, its corrections, its expert bill, its training."""
    return {
        "train_examples": examples,
        "corrections": len(current),
        "corrections_changed": sum(c.changed for c in current if c.dropped is None),
        "corrections_dropped": sum(c.dropped is not None for c in current),
        "corrections_unrealizable": sum(bool(c.unobserved or c.unjustified) for c in current),
        "train_success": success_rate(list(trajectories.values())),
        **expert_usage_metrics(current, trajectories.values()),  # behaviour cloning: the demonstrations
        "train_s": round(train_s, 1),
    }
