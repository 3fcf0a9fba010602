"""Adapter to the original WebShop server (`python -m web_agent_site.app`, port 3000 by default).

It walks the server's routes the way ReAct's WebShop runner does and reads the HTML back in text mode:
    /<session>                                                     search page (goal chosen by session id)
    /search_results/<session>/<keywords>/<page>                    results
    /item_page/<session>/<asin>/<keywords>/<page>/<options>        item page
    /item_sub_page/<session>/<asin>/<keywords>/<page>/<sub>/<options>
    /done/<session>/<asin>/<options>                               purchase; the score is in `#reward pre`
Sessions named `fixed_<i>` get the server's i-th goal. Splits follow the WebShop IL/RL code's goal ranges:
`unseen` = goals 0-499 (its test set), `seen` = 500-1499 (its dev set), `train` = 1500 onwards. The server
keeps its goals to itself, so there is no privileged state or oracle over HTTP.

Only the standard library is used (urllib, html.parser).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any

from leap_dspy.envs.webshop.pages import (
    BACK_TO_SEARCH,
    END_BUTTON,
    NEXT_PAGE,
    PREV_PAGE,
    SEP,
    SUB_PAGES,
    parse_action,
)
from leap_dspy.types import Observation, Task

SPLIT_OFFSETS = {"unseen": 0, "seen": 500, "train": 1500}
MAX_PAGE_BYTES = 4 * 1024 * 1024
"""A WebShop page is tens of kilobytes; anything past this is not a page the agent could read."""
_SKIP_TAGS = {"script", "style", "head", "title", "meta"}
_VOID = {"input", "img", "br", "hr", "meta", "link"}


class WebShopServerUnavailable(ConnectionError):
    pass


def unreachable_message(url: str, reason: object) -> str:
    return (
        f"WebShop server not reachable at {url} ({reason}). Start the original site "
        "(github.com/princeton-nlp/WebShop: `./setup.sh -d all`, then `python -m web_agent_site.app`, which "
        "listens on port 3000) and pass server_url='http://127.0.0.1:3000', or leave server_url unset to use "
        "the offline generated catalog."
    )


class _PageParser(HTMLParser):
    """Visible text nodes plus WebShop's clickables: `.btn` buttons, `.product-link` links, option radios."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.buttons: list[str] = []
        self.links: list[str] = []
        self.radios: list[tuple[str, str]] = []  # (option name, value)
        self.has_search_bar = False
        self.reward: float | None = None
        self._stack: list[tuple[str, bool, str]] = []  # (tag, hidden, role)

    def _hidden(self) -> bool:
        return any(h for _, h, _ in self._stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "input":
            if a.get("id") == "search_input" or a.get("name") == "search_query":
                self.has_search_bar = True
            if a.get("type") == "radio" and not self._hidden():
                self.radios.append((a.get("name", ""), a.get("value", "")))
            return
        if tag in _VOID:
            return
        hidden = (
            tag in _SKIP_TAGS
            or "hidden" in a
            or "display:none" in a.get("style", "").replace(" ", "")
            or a.get("id") == "instruction-text"
        )
        role = ""
        if tag == "button" and "btn" in classes:
            role = "button"
        elif tag == "a" and "product-link" in classes:
            role = "link"
        elif tag == "h3" and a.get("id") == "reward":
            role = "reward"
        elif tag == "pre" and any(r == "reward" for _, _, r in self._stack):
            role = "reward-value"
        self._stack.append((tag, hidden, role))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        text = data.strip()
        if not text:
            return
        role = self._stack[-1][2] if self._stack else ""
        if role == "reward-value":
            with contextlib.suppress(ValueError):
                self.reward = float(text)
        if self._hidden():
            return
        if role == "button":
            self.buttons.append(text)
        elif role == "link":
            self.links.append(text)
        self.texts.append(text)


class _RedirectRefused(urllib.error.HTTPError):
    pass


class _SameServer(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the server it was given: never to another host or scheme."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not newurl.startswith(self.origin + "/"):
            raise _RedirectRefused(newurl, code, f"a redirect away from {self.origin} was refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpWebShop:
    """The episode loop over a running WebShop server, with the offline env's action grammar."""

    def __init__(self, url: str, max_steps: int = 15, timeout: float = 10.0, check: bool = True) -> None:
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"webshop: server_url must be an http(s)://host:port address, not {url!r}")
        self.max_steps = max_steps
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_SameServer(f"{parsed.scheme}://{parsed.netloc}"))
        if check:
            self._get(self.url + "/")  # raises WebShopServerUnavailable with instructions

    def _get(self, url: str) -> str:
        try:
            with self._opener.open(url, timeout=self.timeout) as resp:
                body = resp.read(MAX_PAGE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            if url == self.url + "/" and not isinstance(exc, _RedirectRefused):
                return ""  # it answered: the server is up, whatever its home page does
            raise WebShopServerUnavailable(
                f"WebShop server at {self.url} answered {exc.code} ({exc.msg}) for {url}"
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise WebShopServerUnavailable(
                unreachable_message(self.url, getattr(exc, "reason", exc))
            ) from exc
        if len(body) > MAX_PAGE_BYTES:
            raise WebShopServerUnavailable(f"WebShop server at {self.url} sent over {MAX_PAGE_BYTES} bytes for {url}")
        return body.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------------ urls

    @staticmethod
    def _q(value: Any) -> str:
        return urllib.parse.quote(str(value), safe="")

    def _url(self, route: str, /, **s: Any) -> str:
        sess = self._q(s["session"])
        if route == "index":
            return f"{self.url}/{sess}"
        kw = self._q(s["keywords"])
        opts = self._q(s.get("options", {}))
        if route == "search":
            return f"{self.url}/search_results/{sess}/{kw}/{s['page']}"
        if route == "item":
            return f"{self.url}/item_page/{sess}/{self._q(s['asin'])}/{kw}/{s['page']}/{opts}"
        if route == "sub":
            return f"{self.url}/item_sub_page/{sess}/{self._q(s['asin'])}/{kw}/{s['page']}/{s['sub']}/{opts}"
        return f"{self.url}/done/{sess}/{self._q(s['asin'])}/{opts}"

    # ----------------------------------------------------------------------------------------------- tasks

    def tasks(self, split: str, count: int) -> list[Task]:
        out = []
        for i in range(count):
            idx = SPLIT_OFFSETS[split] + i
            session = f"fixed_{idx}"
            html = self._get(self._url("index", session=session))
            out.append(
                Task(
                    id=f"webshop-http-{split}-{idx:04d}",
                    env="webshop",
                    split=split,  # type: ignore[arg-type]
                    instruction=instruction_of(html),
                    session=session,
                    goal_index=idx,
                )
            )
        return out

    # --------------------------------------------------------------------------------------------- episode

    def reset(self, task: Task) -> Observation:
        extra = task.model_extra or {}
        self.state: dict[str, Any] = {
            "session": extra.get("session") or f"fixed_{extra.get('goal_index', 0)}",
            "kind": "index",
            "keywords": "",
            "page": 1,
            "asin": "",
            "options": {},
            "sub": "",
        }
        self.instruction = task.instruction
        self.steps = 0
        self.done = False
        html = self._get(self._url("index", **self.state))
        self.instruction = instruction_of(html) or task.instruction
        return self._observe(html)

    def _observe(self, html: str, prefix: str = "", **info: Any) -> Observation:
        p = _PageParser()
        p.feed(html)
        self.page = p
        if self.state["kind"] == "index":
            text = SEP.join(["WebShop", "Instruction:", self.instruction, "Search"])
        else:
            text = SEP.join(p.texts)
        acts = ["search[<keywords>]"] if p.has_search_bar else []
        acts += [f"click[{c}]" for c in self._clickables()]
        return Observation(
            text=prefix + text,
            admissible_actions=acts,
            info={"page": self.state["kind"], "step": self.steps, **info},
        )

    def _clickables(self) -> list[str]:
        p = self.page
        return [b for b in p.buttons if b.lower() != "search"] + p.links + [v for _, v in p.radios]

    def step(self, action: str) -> Observation:
        if self.done:
            return Observation(text="The episode is over.", done=True)
        self.steps += 1
        try:
            obs = self._step(action)
        except WebShopServerUnavailable as exc:
            obs = Observation(
                text=f"Invalid action: the server failed: {exc}", done=True, info={"error": str(exc)}
            )
            self.done = True
            return obs
        if not obs.done and self.steps >= self.max_steps:
            self.done = True
            obs.done = True
            obs.text += f"\nEpisode over: the step limit ({self.max_steps}) was reached without a purchase."
            obs.admissible_actions = []
        return obs

    def _invalid(self, why: str) -> Observation:
        # Re-render the current page from its URL (cheap, and keeps the observation self-contained).
        html = self._get(self._current_url())
        return self._observe(html, prefix=f"Invalid action: {why}.\n", valid=False)

    def _current_url(self) -> str:
        kind = {"index": "index", "results": "search", "item": "item", "sub": "sub"}[self.state["kind"]]
        return self._url(kind, **self.state)

    def _step(self, action: str) -> Observation:
        name, arg, error = parse_action(action)
        if error is not None:
            return self._invalid(error)
        assert arg is not None
        s = self.state
        if name == "search":
            if not self.page.has_search_bar:
                return self._invalid(f"there is no search box on this page; click[{BACK_TO_SEARCH}] first")
            s.update(kind="results", keywords=str(arg.lower().split(" ")), page=1, asin="", options={})
            return self._observe(self._get(self._url("search", **s)), valid=True)
        lowered = {c.lower(): c for c in self._clickables()}
        target = lowered.get(arg.lower())
        if target is None:
            return self._invalid(f"there is no {arg[:80]!r} button on this page")
        t = target.lower()
        if t == BACK_TO_SEARCH.lower():
            s.update(kind="index", asin="", options={}, sub="")
            return self._observe(self._get(self._url("index", **s)), valid=True)
        if t == END_BUTTON.lower():
            return self._buy()
        if t in (NEXT_PAGE.lower(), PREV_PAGE.lower(), "< back to results") and s["kind"] == "results":
            s["page"] += 1 if t == NEXT_PAGE.lower() else -1
            return self._observe(self._get(self._url("search", **s)), valid=True)
        if t in (PREV_PAGE.lower(), "< back to results"):
            if s["kind"] == "sub":
                s.update(kind="item", sub="")
                return self._observe(self._get(self._url("item", **s)), valid=True)
            s.update(kind="results", asin="", options={})
            return self._observe(self._get(self._url("search", **s)), valid=True)
        if t in (x.lower() for x in SUB_PAGES) and s["kind"] == "item":
            s.update(kind="sub", sub=next(x for x in SUB_PAGES if x.lower() == t))
            return self._observe(self._get(self._url("sub", **s)), valid=True)
        if target in self.page.links:
            s.update(kind="item", asin=target, options={})
            return self._observe(self._get(self._url("item", **s)), valid=True)
        for opt_name, value in self.page.radios:
            if value == target:
                s["options"] = {**s["options"], opt_name: value}
                return self._observe(self._get(self._url("item", **s)), valid=True)
        return self._invalid(f"the {target!r} button is not supported by this adapter")


    def _buy(self) -> Observation:
        """`Buy Now`: the server scores the purchase; the episode ends with its reward."""
        s = self.state
        parser = _PageParser()
        parser.feed(self._get(self._url("done", **s)))
        self.done = True
        reward = parser.reward if parser.reward is not None else 0.0
        text = SEP.join(["Thank you for shopping with us!", "Purchased", s["asin"], json.dumps(s["options"]),
                         "Your score (min 0.0, max 1.0)", f"{reward:.4g}"])
        info = {"page": "done", "step": self.steps, "purchased_asin": s["asin"],
                "purchased_options": dict(s["options"]), "score": reward * 100}
        return Observation(text=text, reward=reward, done=True, success=reward >= 1.0 - 1e-9, admissible_actions=[],
                           info=info)


def instruction_of(html: str) -> str:
    """The goal text from a WebShop page's `#instruction-text` header ("Instruction: ...")."""

    class _Instr(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.depth = 0
            self.parts: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if self.depth or dict(attrs).get("id") == "instruction-text":
                self.depth += tag not in _VOID

        def handle_endtag(self, tag: str) -> None:
            if self.depth:
                self.depth -= 1

        def handle_data(self, data: str) -> None:
            if self.depth and data.strip():
                self.parts.append(data.strip())

    parser = _Instr()
    parser.feed(html)
    text = " ".join(parser.parts)
    for head in ("Instruction:", "instruction:"):
        if head in text:
            text = text.split(head, 1)[1]
    return text.split("Current Query:")[0].strip()
