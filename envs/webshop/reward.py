"""WebShop's purchase reward, re-derived from the paper (Yao et al. 2022, §3.1) and `engine/goal.py`.

    reward = r_type * (|attributes matched| + |options matched| + 1[price <= price_upper])
                    / (|goal attributes| + |goal options| + 1)

- attributes: a goal attribute matches when a purchased attribute is a fuzzy match (token-set ratio > 85), or
  when it occurs in the purchased title, features (bullet points) or description;
- options: each chosen option matches a goal option exactly for `size`, fuzzily (> 85) otherwise, or when the
  chosen value occurs in the title, features or description; colours are folded onto base colours first;
- type: r_type = 1 when the search query, >= 2 breadcrumb levels or > 20% of the goal title's nouns match;
  0.5 when none does; 0.1 when under 10% of the goal title's nouns match; 0 when none match.

Two stand-ins for WebShop's third-party pieces: `token_set_ratio` follows thefuzz's definition over difflib's
similarity ratio, and nouns come from the generator's lexicon (`vocab.NOUNS`) instead of spaCy's tagger.
Products and goals are plain dicts (keys below), so the same function scores the offline catalog and
hand-built cases.

product: title, query, product_category, attributes (list), features (list), description
goal:    query, name (the target title), product_category, attributes (list), goal_options (dict or list),
         price_upper
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from leap_dspy.envs.webshop.vocab import COLOR_SET, NOUNS

EXACT_MATCH_OPTS = ("size",)
FUZZY_THRESHOLD = 85

_TOKEN = re.compile(r"[a-z0-9]+")


def _process(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def _ratio(a: str, b: str) -> int:
    if not a and not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz's token_set_ratio: compare the shared tokens against each side's full token set (0-100)."""
    ta, tb = set(_process(a).split()), set(_process(b).split())
    if not ta or not tb:
        return 0
    inter = sorted(ta & tb)
    diff_ab, diff_ba = sorted(ta - tb), sorted(tb - ta)
    if inter and (not diff_ab or not diff_ba):
        return 100
    sect = " ".join(inter)
    comb_ab = " ".join(inter + diff_ab)
    comb_ba = " ".join(inter + diff_ba)
    return max(_ratio(sect, comb_ab), _ratio(sect, comb_ba), _ratio(comb_ab, comb_ba))


def normalize_color(value: str) -> str:
    """Fold a colour phrase onto its base colour ("navy blue" -> "blue"); other values pass unchanged."""
    for color in COLOR_SET:
        if re.search(rf"\b{color}\b", value):
            return color
    return value


def nouns(title: str) -> list[str]:
    return [t for t in _TOKEN.findall(title.lower()) if t in NOUNS]


def _text_fields(product: dict[str, Any]) -> tuple[str, str, str]:
    return (
        product["title"].lower(),
        " ".join(product.get("features", [])).lower(),
        product.get("description", "").lower(),
    )


def type_reward(product: dict[str, Any], goal: dict[str, Any]) -> dict[str, Any]:
    query_match = product.get("query") == goal.get("query")
    bought_cat = {x.strip() for x in product.get("product_category", "").split("›")}
    goal_cat = {x.strip() for x in goal.get("product_category", "").split("›")}
    category_match = len(bought_cat & goal_cat) >= 2
    bought_nouns, goal_nouns = set(nouns(product["title"])), set(nouns(goal["name"]))
    title_score = len(bought_nouns & goal_nouns) / len(goal_nouns) if goal_nouns else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {
        "r_type": r_type,
        "query_match": query_match,
        "category_match": category_match,
        "title_score": title_score,
    }


def attribute_matches(product: dict[str, Any], goal_attributes: list[str]) -> int:
    title, features, description = _text_fields(product)
    matches = 0
    for g_attr in goal_attributes:
        fuzzy = any(token_set_ratio(p, g_attr) > FUZZY_THRESHOLD for p in product.get("attributes", []))
        if fuzzy or g_attr in title or g_attr in features or g_attr in description:
            matches += 1
    return matches


def option_matches(product: dict[str, Any], goal_options: list[str], chosen: dict[str, str]) -> int:
    title, features, description = _text_fields(product)
    goal_values = [normalize_color(o) for o in goal_options]
    matches = 0
    for name, value in chosen.items():
        value = normalize_color(value)
        if name.lower() in EXACT_MATCH_OPTS:
            matched = value in goal_values
        else:
            matched = any(token_set_ratio(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or value in title or value in features or value in description:
            matches += 1
    return matches


def get_reward(
    product: dict[str, Any], goal: dict[str, Any], price: float, options: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    """The purchase reward in [0, 1] and its components (WebShop's `verbose` info)."""
    goal_options = goal["goal_options"]
    goal_option_values = list(goal_options.values()) if isinstance(goal_options, dict) else list(goal_options)
    n_attr, n_opt = len(goal["attributes"]), len(goal_option_values)
    denom = n_attr + n_opt + 1
    t = type_reward(product, goal)
    r_price = price <= goal["price_upper"]
    num_attr = attribute_matches(product, goal["attributes"])
    num_opt = option_matches(product, goal_option_values, options)
    total = (num_attr + num_opt + int(r_price)) / denom * t["r_type"]
    # Options are counted per chosen option; goals here name every option of their product, so the sum stays
    # within the denominator, and the clip only guards hand-built cases.
    total = max(0.0, min(1.0, total))
    info: dict[str, Any] = {
        **t,
        "r_att": num_attr / n_attr if n_attr else None,
        "w_att": n_attr / denom,
        "r_price": r_price,
        "w_price": 1 / denom,
    }
    if n_opt:
        info["r_option"] = num_opt / n_opt
        info["w_option"] = n_opt / denom
    return total, info
