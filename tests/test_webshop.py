"""WebShop: reward, oracle, search ranking, malformed actions, reproducibility, splits, HTTP adapter."""

from __future__ import annotations

import ast
import html
import json
import random
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from leap_dspy.envs import make_env
from leap_dspy.envs.webshop import WebShop, WebShopServerUnavailable, get_reward
from leap_dspy.envs.webshop.agents import evaluate, oracle_policy, random_click_policy
from leap_dspy.envs.webshop.catalog import generate_catalog
from leap_dspy.envs.webshop.reward import normalize_color, token_set_ratio

SMALL = {"num_products": 300, "seed": 0, "num_train": 40, "num_seen": 15, "num_unseen": 20}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = WebShop(**SMALL, cache_dir=str(tmp_path_factory.mktemp("webshop")))
    yield e
    e.close()


# ------------------------------------------------------------------------------------------------- reward

GOAL = {
    "asin": "B0TARGET01",
    # nouns: lumina, hair, extension, set, women (5)
    "name": "Lumina Natural Looking Hair Extension Set for Women",
    "query": "hair extension",
    "product_category": "Beauty & Personal Care › Hair Care › Hair Extensions",
    "attributes": ["natural looking", "heat resistant"],
    "goal_options": {"color": "dark brown", "size": "20 inch"},
    "price_upper": 40.0,
}


def product(**over):
    p = {
        "title": GOAL["name"],
        "query": "hair extension",
        "product_category": GOAL["product_category"],
        "attributes": ["natural looking", "heat resistant", "clip in"],
        "features": ["Clip in design", "Soft to the touch"],
        "description": "A hair extension for everyday wear.",
    }
    p.update(over)
    return p


FULL = {"color": "dark brown", "size": "20 inch"}
DENOM = 2 + 2 + 1  # |attributes| + |options| + price


def test_reward_full_match_is_one():
    r, info = get_reward(product(), GOAL, price=30.0, options=FULL)
    assert r == 1.0
    assert info["r_type"] == 1.0 and info["r_att"] == 1.0 and info["r_option"] == 1.0 and info["r_price"]
    assert info["w_att"] == 2 / DENOM and info["w_option"] == 2 / DENOM and info["w_price"] == 1 / DENOM


def test_reward_wrong_option_loses_one_option_term():
    # size is matched exactly: 16 inch != 20 inch
    r, info = get_reward(product(), GOAL, price=30.0, options={"color": "dark brown", "size": "16 inch"})
    assert r == pytest.approx((2 + 1 + 1) / DENOM) == pytest.approx(0.8)
    assert info["r_option"] == 0.5
    # colour: black is not a fuzzy match for (dark) brown
    r, _ = get_reward(product(), GOAL, price=30.0, options={"color": "black", "size": "20 inch"})
    assert r == pytest.approx(0.8)
    # no option chosen at all: both option terms lost
    r, _ = get_reward(product(), GOAL, price=30.0, options={})
    assert r == pytest.approx((2 + 0 + 1) / DENOM)


def test_reward_wrong_price_loses_price_term():
    r, info = get_reward(product(), GOAL, price=45.0, options=FULL)
    assert r == pytest.approx((2 + 2 + 0) / DENOM)
    assert info["r_price"] is False
    r_edge, _ = get_reward(product(), GOAL, price=40.0, options=FULL)  # "lower than" is price <= bound
    assert r_edge == 1.0


def test_reward_missing_attribute_loses_attribute_term():
    r, info = get_reward(product(attributes=["natural looking"]), GOAL, price=30.0, options=FULL)
    assert r == pytest.approx((1 + 2 + 1) / DENOM)
    assert info["r_att"] == 0.5
    # an attribute found in the description counts (WebShop's text fallback)
    p = product(attributes=["natural looking"], description="Heat resistant fibre.")
    assert get_reward(p, GOAL, price=30.0, options=FULL)[0] == 1.0


def test_reward_wrong_type_scales_by_r_type():
    other_cat = "Clothing, Shoes & Jewelry › Shoes › Sandals"
    # query and category differ; nouns shared: {lumina, set} of 5 -> title score 0.4 > 0.2 -> r_type 1
    p = product(title="Lumina Sandal Set for Men", query="sandal", product_category=other_cat)
    r, info = get_reward(p, GOAL, price=30.0, options=FULL)
    assert info["title_score"] == pytest.approx(0.4) and info["r_type"] == 1.0 and r == 1.0
    # shared nouns {set}: 1/5 = 0.2, not > 0.2, nothing else matches -> r_type 0.5
    p = product(title="Verano Sandal Set for Men", query="sandal", product_category=other_cat)
    r, info = get_reward(p, GOAL, price=30.0, options=FULL)
    assert info["title_score"] == pytest.approx(0.2) and info["r_type"] == 0.5
    assert r == pytest.approx(0.5)
    # same title score, but two breadcrumb levels match -> r_type back to 1
    p = product(
        title="Verano Wig Set for Men",
        query="wig",
        product_category="Beauty & Personal Care › Hair Care › Wigs",
    )
    r, info = get_reward(p, GOAL, price=30.0, options=FULL)
    assert info["category_match"] and info["r_type"] == 1.0
    # no shared noun at all -> r_type 0
    p = product(title="Verano Sandal for Men", query="sandal", product_category=other_cat)
    r, info = get_reward(p, GOAL, price=30.0, options=FULL)
    assert info["title_score"] == 0.0 and r == 0.0
    # wrong type and wrong price combine: 0.5 * 4/5
    p = product(title="Verano Sandal Set for Men", query="sandal", product_category=other_cat)
    assert get_reward(p, GOAL, price=99.0, options=FULL)[0] == pytest.approx(0.5 * 4 / DENOM)


def test_fuzzy_helpers():
    assert token_set_ratio("natural looking", "Natural-looking hair") == 100
    assert token_set_ratio("black", "white") < 85
    assert normalize_color("navy blue") == "blue" and normalize_color("20 inch") == "20 inch"


# ------------------------------------------------------------------------------------------------ episodes


def test_registry_config_and_clone(env):
    assert make_env("webshop", **SMALL, cache_dir=env.cache_dir).config() == env.config()
    twin = env.clone()
    assert twin.config() == env.config() and twin.catalog.products is env.catalog.products
    assert set(WebShop.privilege_levels) == {0, 1, 2, 3} and WebShop.default_privilege_level in (1, 2, 3)


def test_oracle_scores_on_unseen(env):
    tasks = env.tasks("unseen")
    res = evaluate(env, tasks, oracle_policy)
    assert res["episodes"] == SMALL["num_unseen"]
    assert res["score"] >= 95.0
    rnd = evaluate(env, tasks[:10], random_click_policy(0))
    assert rnd["score"] < res["score"]


def test_final_step_info_and_success(env):
    task = env.tasks("seen")[0]
    obs = env.reset(task)
    assert obs.text.startswith("WebShop [SEP] Instruction: [SEP] ") and obs.text.endswith("[SEP] Search")
    assert obs.admissible_actions == ["search[<keywords>]"]
    while not obs.done:
        obs = env.step(env.oracle_action())
    assert obs.success and obs.reward == 1.0
    assert obs.info["purchased_asin"] == task.target_asin
    assert obs.info["reward_components"]["r_type"] == 1.0
    assert env.oracle_action() is None
    assert env.step("click[Buy Now]").done  # after the end: still done, no exception


def test_results_page_layout(env):
    task = env.tasks("train")[0]
    env.reset(task)
    obs = env.step("search[shoe]")
    assert obs.text.startswith("Back to Search [SEP] Page 1 (Total results: ")
    assert "click[Next >]" in obs.admissible_actions and "click[< Prev]" not in obs.admissible_actions
    products = [a for a in obs.admissible_actions if a.startswith("click[B0")]
    assert len(products) == 10
    obs = env.step("click[Next >]")
    assert "Page 2" in obs.text and "click[< Prev]" in obs.admissible_actions
    obs = env.step(products[0].lower())  # not on page 2: invalid
    assert obs.text.startswith("Invalid action")
    obs = env.step("click[< Prev]")
    obs = env.step(products[0].lower())  # product ids are matched case-insensitively
    for button in ("Description", "Features", "Reviews", "Buy Now", "< Prev", "Back to Search"):
        assert f"click[{button}]" in obs.admissible_actions
    obs = env.step("click[Features]")
    assert obs.admissible_actions == ["click[Back to Search]", "click[< Prev]"]


def test_oracle_recovers_from_any_state(env):
    rng = random.Random(3)
    for task in env.tasks("unseen")[:8]:
        obs = env.reset(task)
        obs = env.step("search[something else entirely]")
        for _ in range(rng.randint(0, 4)):
            clicks = [a for a in obs.admissible_actions or [] if a != "click[Buy Now]"]
            if not clicks:
                break
            obs = env.step(rng.choice(clicks))
        plan = env.privileged_state(3).sections["oracle plan"]
        assert plan[-1] == "click[Buy Now]"
        while not obs.done:
            obs = env.step(env.oracle_action())
        assert obs.reward == 1.0, task.id


def test_privileged_levels(env):
    task = env.tasks("unseen")[1]
    env.reset(task)
    assert env.privileged_state(0).sections == {}
    one = env.privileged_state(1)
    assert "goal" in one.sections and "target product" not in one.sections
    assert task.target_asin not in one.to_text()
    two = env.privileged_state(2).to_text()
    assert task.target_asin in two and "price lower than" in two
    three = env.privileged_state(3).sections
    assert three["oracle plan"][0].startswith("search[") and three["oracle plan"][-1] == "click[Buy Now]"
    with pytest.raises(ValueError):
        env.privileged_state(9)


# -------------------------------------------------------------------------------------------------- search


def test_fts_ranks_target_for_oracle_query(env):
    for task in env.tasks("unseen") + env.tasks("seen"):
        env.reset(task)
        top = [p["asin"] for p in env.catalog.search(env.oracle_query(), limit=10)]
        assert task.target_asin in top
    # bm25 ranks a product's own title first, and an irrelevant query matches nothing
    p = env.catalog.products[7]
    assert env.catalog.search(p["title"])[0]["asin"] == p["asin"]
    assert env.catalog.search("zzzqqq xyzzy") == []
    assert env.catalog.search("!!! ??? ()") == []


# --------------------------------------------------------------------------------------- malformed actions


@pytest.mark.parametrize(
    "action",
    [
        "click[nonexistent]",
        "search[]",
        "search[   ]",
        "search[shoes",
        "click]Buy Now[",
        "click[[x]]",
        "buy",
        "",
        "x" * 10_000,
        "click[" + "y" * 10_000 + "]",
        "click[Buy Now]",
    ],
)
def test_malformed_actions_say_so(env, action):
    task = env.tasks("train")[1]
    env.reset(task)
    obs = env.step(action)
    assert obs.text.startswith("Invalid action:") and not obs.done and obs.reward == 0.0
    assert len(obs.text) < 1_000
    assert obs.admissible_actions == ["search[<keywords>]"]


def test_search_without_search_box_and_long_query(env):
    env.reset(env.tasks("train")[2])
    obs = env.step("search[" + "hoodie " * 1500 + "]")  # 10 kB of keywords: still a search
    assert obs.text.startswith("Back to Search") and not obs.done
    obs = env.step("search[hoodie]")
    assert obs.text.startswith("Invalid action: there is no search box")


def test_step_limit_ends_episode_without_reward(env):
    env.reset(env.tasks("train")[3])
    for i in range(env.max_steps):
        obs = env.step("click[nothing]")
        assert obs.done == (i == env.max_steps - 1)
    assert obs.reward == 0.0 and not obs.success and "step limit" in obs.text


# ------------------------------------------------------------------------------------ reproducibility, splits


def test_catalog_and_tasks_reproducible(tmp_path):
    a = generate_catalog(120, seed=5)
    assert a == generate_catalog(120, seed=5)
    assert a != generate_catalog(120, seed=6)
    e1 = WebShop(**{**SMALL, "num_products": 120, "seed": 5}, cache_dir=str(tmp_path / "a"))
    e2 = WebShop(**{**SMALL, "num_products": 120, "seed": 5}, cache_dir=str(tmp_path / "b"))
    for split in ("train", "seen", "unseen"):
        assert [t.model_dump() for t in e1.tasks(split)] == [t.model_dump() for t in e2.tasks(split)]
    assert e1.catalog.search("natural looking wig")[:5] == e2.catalog.search("natural looking wig")[:5]


def test_splits_hold_out_product_types(env):
    train, seen, unseen = (env.tasks(s) for s in ("train", "seen", "unseen"))
    train_types = {t.product_type for t in train}
    assert {t.product_type for t in seen} <= train_types
    assert not {t.product_type for t in unseen} & train_types
    assert not {t.target_asin for t in train} & {t.target_asin for t in seen}
    assert {t.split for t in unseen} == {"unseen"}
    for t in unseen:
        assert "price lower than" in t.instruction and t.goal_attributes
        assert all(v in t.instruction for v in t.goal_options.values())


# ----------------------------------------------------------------------------------------------- HTTP adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_adapter_unreachable_says_so():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(WebShopServerUnavailable) as err:
        WebShop(server_url=url)
    msg = str(err.value)
    assert url in msg and "web_agent_site" in msg and "server_url" in msg


def test_http_adapter_refuses_other_schemes_huge_pages_and_redirects_elsewhere():
    from leap_dspy.envs.webshop.http import MAX_PAGE_BYTES, HttpWebShop

    for bad in ("file:///etc/passwd", "ftp://127.0.0.1/", "127.0.0.1:3000"):
        with pytest.raises(ValueError, match="http"):
            WebShop(server_url=bad)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://192.0.2.1/elsewhere")
                self.end_headers()
                return
            data = b"x" * (MAX_PAGE_BYTES + 10) if self.path == "/big" else b"<html>ok</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shop = HttpWebShop(f"http://127.0.0.1:{server.server_address[1]}")
        assert shop._get(shop.url + "/small") == "<html>ok</html>"
        with pytest.raises(WebShopServerUnavailable, match="bytes"):
            shop._get(shop.url + "/big")
        with pytest.raises(WebShopServerUnavailable, match="redirect away"):
            shop._get(shop.url + "/away")
    finally:
        server.shutdown()
        server.server_close()


def _fake_webshop_server(env: WebShop, goals: list[dict]) -> ThreadingHTTPServer:
    """A stand-in for `web_agent_site.app`: its routes and its templates' HTML structure, over our catalog."""
    catalog = env.catalog
    esc = html.escape

    def head(instruction: str, keywords: str = "") -> str:
        return (
            f'<div id="instruction-text"><h4>Instruction: {esc(instruction)}</h4>'
            f"<h4>Current Query: {esc(keywords)}</h4></div>"
        )

    def btn(text: str) -> str:
        return (
            f'<form method="post"><button type="submit" class="btn btn-primary">{esc(text)}</button></form>'
        )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            parts = [urllib.parse.unquote(x) for x in self.path.strip("/").split("/")]
            if parts == [""]:
                self.send_response(302)
                self.send_header("Location", "/abc")
                self.end_headers()
                return
            route = parts[0] if len(parts) > 1 else "index"
            session = parts[1] if len(parts) > 1 else parts[0]
            goal = goals[int(session.split("_")[-1])] if "fixed" in session else goals[0]
            instr = goal["instruction_text"]
            body = "<html><head><title>WebShop</title><script>var x = 1;</script></head><body>"
            if route == "index":
                body += head(instr) + (
                    '<form><input id="search_input" type="text" name="search_query">'
                    '<button type="submit" class="btn btn-success">Search</button></form>'
                )
            elif route == "search_results":
                keywords, page = ast.literal_eval(parts[2]), int(parts[3])
                hits = catalog.search(" ".join(keywords))
                body += head(instr, " ".join(keywords)) + f"<h1>Results</h1><p>Page {page} of {len(hits)}</p>"
                body += btn("Back to Search") + (btn("< Prev") if page > 1 else "")
                body += btn("Next >") if page * 10 < len(hits) else ""
                for p in hits[(page - 1) * 10 : page * 10]:
                    body += (
                        f'<div class="grid-item"><h4><a class="product-link" href="#">{p["asin"]}</a></h4>'
                        f"<h4>{esc(p['title'])}</h4><h5>${p['price']}</h5></div>"
                    )
            elif route in ("item_page", "item_sub_page"):
                p = catalog.by_asin[parts[2]]
                body += head(instr) + btn("Back to Search") + btn("< Prev")
                if route == "item_page":
                    for name, values in p["options"].items():
                        body += f"<h4>{name}</h4>" + "".join(
                            f'<input type="radio" id="radio_{name}{i}" name="{name}" value="{v}">'
                            f'<label for="radio_{name}{i}">{v}</label>'
                            for i, v in enumerate(values)
                        )
                    body += f"<h2>{esc(p['title'])}</h2><h4>Price: ${p['price']}</h4>"
                    body += "".join(btn(x) for x in ("Description", "Features", "Reviews"))
                    body += '<button type="submit" class="btn btn-lg purchase">Buy Now</button>'
                else:
                    body += f"<p>{esc(p['description'])}</p>"
            elif route == "done":
                p = catalog.by_asin[parts[2]]
                reward, _ = get_reward(p, goal, p["price"], ast.literal_eval(parts[3]))
                body += (
                    '<h1>Thank you for shopping with us!</h1><div style="display:none">'
                    f'<h4 id="goal-asin">asin<pre>{goal["asin"]}</pre></h4></div>'
                    f'<h3 id="reward">Your score (min 0.0, max 1.0)<pre>{reward}</pre></h3>'
                )
            body += "</body></html>"
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def test_http_adapter_drives_webshop_pages(env):
    tasks = env.tasks("unseen")[:2]
    goals = [env.goal_of(t) for t in tasks]
    server = _fake_webshop_server(env, goals)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = WebShop(server_url=url, num_unseen=2)
        assert remote.config()["server_url"] == url
        rtasks = remote.tasks("unseen")
        assert [t.instruction for t in rtasks] == [t.instruction for t in tasks]
        for offline_task, rtask in zip(tasks, rtasks, strict=True):
            env.reset(offline_task)
            plan = env.oracle_plan()
            obs = remote.reset(rtask)
            assert (
                obs.text.startswith("WebShop [SEP] Instruction:")
                and "search[<keywords>]" in obs.admissible_actions
            )
            assert remote.privileged_state(2).sections == {} and remote.oracle_action() is None
            bad = remote.step("click[nonexistent]")
            assert bad.text.startswith("Invalid action") and not bad.done
            for action in plan:
                obs = remote.step(action)
                if action.startswith("search["):
                    assert offline_task.target_asin in obs.text and "Instruction" not in obs.text
                    assert "click[Back to Search]" in obs.admissible_actions
            assert obs.done and obs.reward == 1.0 and obs.success
            assert offline_task.target_asin in obs.text and json.loads(obs.text.split(" [SEP] ")[3])
    finally:
        server.shutdown()
        server.server_close()
