"""`WebShop`: the offline WebShop text environment, or an adapter to a running WebShop server."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, ClassVar

from leap_dspy.envs.base import TextEnv
from leap_dspy.envs.webshop import pages
from leap_dspy.envs.webshop.catalog import PRODUCT_WINDOW, Catalog, make_goal, unseen_types
from leap_dspy.envs.webshop.expertise import WebShopExpertise
from leap_dspy.envs.webshop.reward import get_reward
from leap_dspy.types import Observation, PrivilegedState, Split, Task

DEFAULT_NUM_PRODUCTS = 10_000
DEFAULT_SEEN_TASKS, DEFAULT_UNSEEN_TASKS = 20, 60
"""A compile evaluates the student on both after every stage: 60 unseen goals, so that one episode moves
success by under 2 points, and fewer seen ones, which are not the headline. WebShop's own evaluation is 100 +
100; pass `num_seen`/`num_unseen` (`--set`) for it."""


def _interleave_by_type(products: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in products:
        groups.setdefault(p["type"], []).append(p)
    out: list[dict[str, Any]] = []
    queues = [groups[k] for k in sorted(groups)]
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


class WebShop(TextEnv):
    """WebShop (Yao et al. 2022) in text mode: `search[keywords]` and `click[button]`, reward at `Buy Now`.

    Offline (default): a catalog of `num_products` generated products (`catalog.py`), searched through SQLite
    FTS5 with bm25, goals generated from target products. Splits: `train` and `seen` target product types that
    `train` covers (disjoint target products); `unseen` targets held-out product types only.

    With `server_url`, the same class drives a running `web_agent_site` Flask app over HTTP (`http.py`);
    the server keeps its own goals, so the privileged state and the oracle are not available there.

    The score WebShop reports is the mean reward x 100; success is reward == 1.
    """

    name: ClassVar[str] = "webshop"
    privilege_levels: ClassVar[dict[int, str]] = {
        0: "nothing",
        1: "the goal: its attributes, options and price bound",
        2: "level 1 + the target product's id, title and price",
        3: "level 2 + the oracle's click path from the current page to the purchase",
    }
    default_privilege_level: ClassVar[int] = 2
    """The scripted expert plays at every level below the top (`expertise.py`); level 2 is the highest where it
    acts on its own policy: it shops from what the student sees and uses the target's id only to break ties
    between equally good results, so its corrections stay realizable while it wins most tasks."""
    answer_tokens: ClassVar[int] = 128
    """A search's keywords come from the instruction and run long."""
    reports_score: ClassVar[bool] = True
    """Rewards are graded (0..1): metrics report WebShop's score (mean reward x 100) next to success."""

    def __init__(
        self,
        num_products: int = DEFAULT_NUM_PRODUCTS,
        seed: int = 0,
        num_train: int = 500,
        num_seen: int = DEFAULT_SEEN_TASKS,
        num_unseen: int = DEFAULT_UNSEEN_TASKS,
        max_steps: int = 15,
        cache_dir: str | None = None,
        server_url: str | None = None,
    ) -> None:
        bounds = (("num_products", num_products, 1), ("num_train", num_train, 0), ("num_seen", num_seen, 0),
                  ("num_unseen", num_unseen, 0), ("max_steps", max_steps, 1))
        for key, value, least in bounds:
            if value < least:
                raise ValueError(f"webshop: {key} must be at least {least}, not {value}")
        self.num_products = num_products
        self.seed = seed
        self.num_train = num_train
        self.num_seen = num_seen
        self.num_unseen = num_unseen
        self.max_steps = max_steps
        self.cache_dir = cache_dir
        self.server_url = server_url
        self._tasks: dict[str, list[Task]] | None = None
        self._task: Task | None = None
        self._goal: dict[str, Any] | None = None
        self._state = pages.PageState()
        self._steps = 0
        self._done = False
        self._oracle_query: str | None = None
        self._http = None
        self.catalog: Catalog | None = None
        if server_url is not None:
            from leap_dspy.envs.webshop.http import HttpWebShop

            self._http = HttpWebShop(server_url, max_steps=max_steps)
        else:
            self.catalog = Catalog.open(num_products, seed, cache_dir)

    def config(self) -> dict[str, Any]:
        return {
            "num_products": self.num_products,
            "seed": self.seed,
            "num_train": self.num_train,
            "num_seen": self.num_seen,
            "num_unseen": self.num_unseen,
            "max_steps": self.max_steps,
            "cache_dir": self.cache_dir,
            "server_url": self.server_url,
        }

    # ------------------------------------------------------------------------------------------------ tasks

    def tasks(self, split: Split) -> list[Task]:
        if self._http is not None:
            count = {"train": self.num_train, "seen": self.num_seen, "unseen": self.num_unseen}[split]
            return self._http.tasks(split, count)
        if self._tasks is None:
            self._tasks = self._make_tasks()
        return list(self._tasks[split])

    def _make_tasks(self) -> dict[str, list[Task]]:
        assert self.catalog is not None
        held = unseen_types(self.seed)
        rng = random.Random(f"webshop-goals-{self.seed}")
        products = sorted(self.catalog.products, key=lambda p: p["asin"])
        rng.shuffle(products)
        # Round-robin over product types, so that any `train` of at least as many tasks as there are seen
        # types covers every type that `seen` can target.
        seen_pool = _interleave_by_type([p for p in products if p["type"] not in held])
        unseen_pool = _interleave_by_type([p for p in products if p["type"] in held])
        n_train = min(self.num_train, max(0, len(seen_pool) - self.num_seen))
        pools: dict[str, list[dict[str, Any]]] = {
            "train": seen_pool[:n_train],
            "seen": seen_pool[n_train : n_train + self.num_seen],
            "unseen": unseen_pool[: self.num_unseen],
        }
        out: dict[str, list[Task]] = {}
        for split, pool in pools.items():
            split_rng = random.Random(f"webshop-goals-{self.seed}-{split}")
            out[split] = [self._task_from_goal(split, i, make_goal(p, split_rng)) for i, p in enumerate(pool)]
        return out

    def _task_from_goal(self, split: str, index: int, goal: dict[str, Any]) -> Task:
        return Task(
            id=f"webshop-{split}-{index:04d}",
            env=self.name,
            split=split,  # type: ignore[arg-type]
            instruction=goal["instruction_text"],
            target_asin=goal["asin"],
            goal_attributes=goal["attributes"],
            goal_options=goal["goal_options"],
            price_upper=goal["price_upper"],
            product_type=goal["query"],
            category=goal["category"],
        )

    def goal_of(self, task: Task) -> dict[str, Any]:
        """The reward's goal dict for a task (rebuilt from the task's fields and its target product)."""
        assert self.catalog is not None
        extra = task.model_extra or {}
        target = self.catalog.by_asin.get(extra.get("target_asin", ""))
        if target is None:
            raise ValueError(
                f"task {task.id}: target product {extra.get('target_asin')!r} is not in the catalog"
            )
        return {
            "asin": target["asin"],
            "name": target["title"],
            "query": target["query"],
            "category": target["category"],
            "product_category": target["product_category"],
            "attributes": list(extra.get("goal_attributes", [])),
            "goal_options": dict(extra.get("goal_options", {})),
            "price_upper": float(extra.get("price_upper", 1_000_000.0)),
            "instruction_text": task.instruction,
        }

    # ------------------------------------------------------------------------------------------ episode loop

    def reset(self, task: Task) -> Observation:
        self._task = task
        if self._http is not None:
            return self._http.reset(task)
        self._goal = self.goal_of(task)
        self._state = pages.PageState()
        self._steps = 0
        self._done = False
        self._oracle_query = None
        return self._observe(self._state)

    def _observe(self, state: pages.PageState, prefix: str = "", **info: Any) -> Observation:
        assert self.catalog is not None and self._task is not None
        text = pages.render(state, self.catalog, self._task.instruction)
        return Observation(
            text=prefix + text,
            admissible_actions=pages.admissible(state, self.catalog),
            info={"page": state.kind, "step": self._steps, **info},
        )

    def step(self, action: str) -> Observation:
        if self._http is not None:
            return self._http.step(action)
        if self._task is None or self._goal is None:
            return Observation(text="Invalid action: call reset(task) before step().", done=True)
        if self._done:
            return Observation(text="The episode is over.", done=True, info={"page": self._state.kind})
        assert self.catalog is not None
        self._steps += 1
        tr = pages.apply(self._state, action if isinstance(action, str) else "", self.catalog)
        self._state = tr.state
        if tr.purchased:
            return self._purchase()
        prefix = f"Invalid action: {tr.error}.\n" if tr.error else ""
        obs = self._observe(self._state, prefix, valid=tr.error is None)
        if self._steps >= self.max_steps:
            self._done = True
            obs.done = True
            obs.text += f"\nEpisode over: the step limit ({self.max_steps}) was reached without a purchase."
            obs.admissible_actions = []
            obs.info.update(reward_components=None, truncated=True)
        return obs

    def _purchase(self) -> Observation:
        assert self.catalog is not None and self._goal is not None
        product = self.catalog.by_asin[self._state.asin]
        chosen = self._state.chosen
        reward, components = get_reward(product, self._goal, product["price"], chosen)
        self._done = True
        text = pages.render(self._state, self.catalog, "", reward=reward)
        return Observation(
            text=text,
            reward=reward,
            done=True,
            success=reward >= 1.0 - 1e-9,
            admissible_actions=[],
            info={
                "page": "done",
                "step": self._steps,
                "valid": True,
                "purchased_asin": product["asin"],
                "purchased_options": chosen,
                "price": product["price"],
                "reward_components": components,
                "score": reward * 100,
            },
        )

    # --------------------------------------------------------------------------------------- privileged side

    def privileged_state(self, level: int) -> PrivilegedState:
        self.check_level(level)
        sections: dict[str, str | list[str]] = {}
        if level == 0 or self._http is not None or self._goal is None:
            return PrivilegedState(level=level, sections=sections)
        goal = self._goal
        opts = ", ".join(f"{k}: {v}" for k, v in goal["goal_options"].items()) or "(none)"
        sections["goal"] = [
            f"attributes: {', '.join(goal['attributes'])}",
            f"options: {opts}",
            f"price lower than: {goal['price_upper']:.2f} dollars",
        ]
        if level >= 2:
            assert self.catalog is not None
            target = self.catalog.by_asin[goal["asin"]]
            sections["target product"] = [
                f"id: {target['asin']}",
                f"title: {target['title']}",
                f"price: ${target['price']:.2f}",
            ]
        if level >= 3:
            sections["oracle plan"] = self.oracle_plan()
        return PrivilegedState(level=level, sections=sections)

    def expertise(self) -> WebShopExpertise:
        """WebShop's scripted expert (`expertise.py`): a policy at levels 0-2 that shops from what the student
        sees, reasons naming what on the page matches or contradicts the instruction, and the oracle at the
        top level wherever its step is one the student could justify."""
        return WebShopExpertise()

    def oracle_query(self) -> str:
        """Keywords that put the target on the first results page: the goal's words when they suffice,
        else the target's brand and type, else its full title."""
        assert self.catalog is not None and self._goal is not None
        if self._oracle_query is None:
            goal = self._goal
            target = self.catalog.by_asin[goal["asin"]]
            candidates = [
                " ".join([*goal["attributes"], target["type"]]),
                " ".join([target["brand"], *goal["attributes"], target["type"]]),
                target["title"].lower(),
            ]
            self._oracle_query = candidates[-1]
            for query in candidates:
                top = [p["asin"] for p in self.catalog.search(query, limit=PRODUCT_WINDOW)]
                if goal["asin"] in top:
                    self._oracle_query = query
                    break
        return self._oracle_query

    def _oracle_next(self, state: pages.PageState) -> str | None:
        assert self.catalog is not None and self._goal is not None
        goal = self._goal
        target = goal["asin"]
        if state.kind == "done":
            return None
        if state.kind == "search":
            return f"search[{self.oracle_query()}]"
        if state.kind == "results":
            if target in state.results:
                want_page = state.results.index(target) // PRODUCT_WINDOW + 1
                if want_page == state.page:
                    return f"click[{target}]"
                return f"click[{pages.NEXT_PAGE if want_page > state.page else pages.PREV_PAGE}]"
            return f"click[{pages.BACK_TO_SEARCH}]"
        if state.kind == "sub":
            return f"click[{pages.PREV_PAGE if state.asin == target else pages.BACK_TO_SEARCH}]"
        # item page
        if state.asin != target:
            return f"click[{pages.PREV_PAGE if target in state.results else pages.BACK_TO_SEARCH}]"
        chosen = state.chosen
        for name, value in goal["goal_options"].items():
            if chosen.get(name) != value:
                return f"click[{value}]"
        return f"click[{pages.END_BUTTON}]"

    def oracle_action(self) -> str | None:
        if self._http is not None or self._goal is None or self._done:
            return None
        return self._oracle_next(self._state)

    def oracle_plan(self, limit: int = 20) -> list[str]:
        """The oracle's actions from the current page to the purchase (simulated; the episode stays)."""
        if self._http is not None or self._goal is None or self._done:
            return []
        assert self.catalog is not None
        state, plan = replace(self._state), []
        while len(plan) < limit:
            action = self._oracle_next(state)
            if action is None:
                break
            plan.append(action)
            tr = pages.apply(state, action, self.catalog)
            if tr.error is not None or tr.purchased:
                break
            state = tr.state
        return plan

    def close(self) -> None:
        if self.catalog is not None:
            self.catalog.close()
