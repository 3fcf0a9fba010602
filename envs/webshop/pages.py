"""WebShop's pages as a small state machine over the offline catalog, rendered in WebShop's text mode.

Pages and their buttons follow `web_agent_site` (templates and `SimServer.receive`):
- search page: a search box (`search[...]`);
- results page: `Back to Search`, `< Prev` (page > 1), `Next >` (more results), one link per product (its id);
- item page: `Back to Search`, `< Prev` (to the results), one button per option value, `Description`,
  `Features`, `Reviews`, `Buy Now`;
- item sub-page (description, features, reviews): `Back to Search`, `< Prev` (to the item page);
- done page, after `Buy Now`.
Texts are joined with " [SEP] " like WebShop's `simple` text mode. The instruction appears on the search page
only (as in ReAct's WebShop prompts) to keep observations short; chosen options are announced the way
WebShop's `text_rich` mode does ("You have clicked dark brown.").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from leap_dspy.envs.webshop.catalog import PRODUCT_WINDOW, Catalog

END_BUTTON = "Buy Now"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BACK_TO_SEARCH = "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews")
SEP = " [SEP] "
MAX_ECHO = 80

_ACTION = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class PageState:
    kind: str = "search"  # search | results | item | sub | done
    keywords: str = ""
    page: int = 1
    results: tuple[str, ...] = ()
    asin: str = ""
    options: tuple[tuple[str, str], ...] = ()
    sub: str = ""

    @property
    def chosen(self) -> dict[str, str]:
        return dict(self.options)


@dataclass
class Transition:
    state: PageState
    error: str | None = None
    purchased: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_action(action: str) -> tuple[str | None, str | None, str | None]:
    """(name, argument, error): `search[keywords]` or `click[button]`, anything else an error."""
    if not isinstance(action, str):
        return None, None, "the action must be text"
    m = _ACTION.match(action)
    if m is None:
        shown = action.strip()
        shown = shown if len(shown) <= MAX_ECHO else shown[:MAX_ECHO] + "..."
        return (
            None,
            None,
            (f"could not parse {shown!r}; use search[keywords] or click[button] with balanced brackets"),
        )
    name, arg = m.group(1).lower(), m.group(2).strip()
    if "[" in arg or "]" in arg:
        return None, None, "unbalanced or nested brackets; use search[keywords] or click[button]"
    if not arg:
        return (
            name,
            None,
            f"{name}[] is empty; "
            + ("give keywords, e.g. search[red running shoes]" if name == "search" else "name a button"),
        )
    return name, arg, None


def buttons(state: PageState, catalog: Catalog) -> list[str]:
    """The page's clickable texts, in page order (WebShop's `clickables`)."""
    if state.kind == "results":
        out = [BACK_TO_SEARCH]
        if state.page > 1:
            out.append(PREV_PAGE)
        if state.page * PRODUCT_WINDOW < len(state.results):
            out.append(NEXT_PAGE)
        out.extend(page_results(state))
        return out
    if state.kind == "item":
        product = catalog.by_asin[state.asin]
        out = [BACK_TO_SEARCH, PREV_PAGE]
        for values in product["options"].values():
            out.extend(values)
        out.extend(SUB_PAGES)
        out.append(END_BUTTON)
        return out
    if state.kind == "sub":
        return [BACK_TO_SEARCH, PREV_PAGE]
    return []


def has_search_bar(state: PageState) -> bool:
    return state.kind == "search"


def admissible(state: PageState, catalog: Catalog) -> list[str]:
    acts = ["search[<keywords>]"] if has_search_bar(state) else []
    return acts + [f"click[{b}]" for b in buttons(state, catalog)]


def page_results(state: PageState) -> list[str]:
    start = (state.page - 1) * PRODUCT_WINDOW
    return list(state.results[start : start + PRODUCT_WINDOW])


def render(state: PageState, catalog: Catalog, instruction: str, reward: float | None = None) -> str:
    if state.kind == "search":
        return SEP.join(["WebShop", "Instruction:", instruction, "Search"])
    if state.kind == "results":
        parts = [BACK_TO_SEARCH, f"Page {state.page} (Total results: {len(state.results)})"]
        if state.page > 1:
            parts.append(PREV_PAGE)
        if state.page * PRODUCT_WINDOW < len(state.results):
            parts.append(NEXT_PAGE)
        for asin in page_results(state):
            p = catalog.by_asin[asin]
            parts += [asin, p["title"], f"${p['price']:.2f}"]
        if not state.results:
            parts.append("No results found.")
        return SEP.join(parts)
    product = catalog.by_asin.get(state.asin, {})
    if state.kind == "item":
        head = "".join(f"You have clicked {v}.\n" for _, v in state.options)
        parts = [BACK_TO_SEARCH, PREV_PAGE]
        for name, values in product["options"].items():
            parts += [name, *values]
        parts += [product["title"], f"Price: ${product['price']:.2f}", f"Rating: {product['rating']}"]
        parts += [*SUB_PAGES, END_BUTTON]
        return head + SEP.join(parts)
    if state.kind == "sub":
        parts = [BACK_TO_SEARCH, PREV_PAGE]
        if state.sub == "Description":
            parts.append(product["description"])
        elif state.sub == "Features":
            parts += product["features"]
        else:
            for r in product["reviews"]:
                parts += [r["title"], f"{r['score']} stars", r["body"]]
        return SEP.join(parts)
    # done
    parts = ["Thank you for shopping with us!", "Purchased", state.asin, json.dumps(state.chosen)]
    if reward is not None:
        parts += ["Your score (min 0.0, max 1.0)", f"{reward:.4g}"]
    return SEP.join(parts)


def apply(state: PageState, action: str, catalog: Catalog) -> Transition:
    """The page an action leads to; an invalid action leaves the page unchanged and says why."""
    if state.kind == "done":
        return Transition(state, "the episode is over: the purchase was made")
    name, arg, error = parse_action(action)
    if error is not None:
        return Transition(state, error)
    assert name is not None and arg is not None
    if name == "search":
        if not has_search_bar(state):
            return Transition(state, f"there is no search box on this page; click[{BACK_TO_SEARCH}] first")
        hits = tuple(p["asin"] for p in catalog.search(arg))
        return Transition(PageState(kind="results", keywords=arg.lower(), page=1, results=hits))
    clickables = buttons(state, catalog)
    lowered = {b.lower(): b for b in clickables}
    target = lowered.get(arg.lower())
    if target is None:
        shown = arg if len(arg) <= MAX_ECHO else arg[:MAX_ECHO] + "..."
        if not clickables:
            return Transition(
                state, f"there is nothing to click on this page (click[{shown}]); use search[...]"
            )
        return Transition(state, f"there is no {shown!r} button on this page")
    if target == BACK_TO_SEARCH:
        return Transition(PageState(kind="search"))
    if state.kind == "results":
        if target == NEXT_PAGE:
            return Transition(replace(state, page=state.page + 1))
        if target == PREV_PAGE:
            return Transition(replace(state, page=state.page - 1))
        return Transition(replace(state, kind="item", asin=target, options=()))
    if state.kind == "item":
        if target == PREV_PAGE:
            return Transition(replace(state, kind="results", asin="", options=()))
        if target in SUB_PAGES:
            return Transition(replace(state, kind="sub", sub=target))
        if target == END_BUTTON:
            return Transition(replace(state, kind="done"), purchased=True)
        product = catalog.by_asin[state.asin]
        option_name = next(n for n, values in product["options"].items() if target in values)
        chosen = state.chosen
        chosen[option_name] = target
        return Transition(replace(state, options=tuple(chosen.items())))
    # sub page: only < Prev is left
    return Transition(replace(state, kind="item", sub=""))
