"""Reference policies and WebShop's two metrics: score (mean reward x 100) and success rate (reward == 1)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from leap_dspy.envs.webshop.env import WebShop
from leap_dspy.types import Observation, Task

Policy = Callable[[WebShop, Task, Observation], str]


def oracle_policy(env: WebShop, task: Task, obs: Observation) -> str:
    return env.oracle_action() or "click[Buy Now]"


def random_click_policy(seed: int = 0) -> Policy:
    """Searches the instruction text verbatim, then clicks uniformly among the page's buttons."""
    rng = random.Random(seed)

    def act(env: WebShop, task: Task, obs: Observation) -> str:
        acts = obs.admissible_actions or []
        if any(a.startswith("search[") for a in acts):
            return f"search[{task.instruction}]"
        clicks = [a for a in acts if a.startswith("click[")]
        return rng.choice(clicks) if clicks else "click[Back to Search]"

    return act


def run_episode(env: WebShop, task: Task, policy: Policy) -> dict[str, Any]:
    obs = env.reset(task)
    steps = 0
    while not obs.done:
        obs = env.step(policy(env, task, obs))
        steps += 1
    return {"task": task.id, "reward": obs.reward, "success": obs.success, "steps": steps}


def evaluate(env: WebShop, tasks: list[Task], policy: Policy) -> dict[str, float]:
    runs = [run_episode(env, t, policy) for t in tasks]
    n = max(1, len(runs))
    return {
        "episodes": len(runs),
        "score": 100 * sum(r["reward"] for r in runs) / n,
        "success_rate": sum(r["success"] for r in runs) / n,
        "mean_steps": sum(r["steps"] for r in runs) / n,
    }
