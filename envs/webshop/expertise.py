"""What WebShop's scripted expert knows: a shopping policy for every privilege level, and reasons written
from the student's view (the instruction, the page it is on, its history).

The LEAP expert is worth imitating when its reason names what, on the page the student sees, matches or
contradicts the instruction ("...; it costs $45.99, not lower than 30.00 dollars: I go back to the results"),
and when the student could have written that reason itself. On a product page every reason first copies what the
page says is clicked and marks each value the instruction asks for (`_checked`), and decides after: a decision
made by the reason's first word was where the small student went wrong. So the policy below (`choose`) shops the way the
student can: it searches with the instruction's words, opens the result whose name shows the most of what
the instruction asks for at a price under its bound, selects the option values the instruction names, and
buys; it leaves a page only for a reason it states, and after `PATIENCE` products it settles for the closest.
Privilege only breaks ties (level 2+: the target among equally good results), never overrules the page.

Levels (see `WebShop.privilege_levels`): 0 reads the goal from the instruction; 1 reads it from the goal
section (the same facts, parsed for certain); 2 adds the target's id, used only to break ties; 3 (top) takes
the oracle's step where it is the policy's kind of step (which result to open, which named option first) and
the student could justify it (`unjustified` is None), else the policy's. Searches are the policy's at every
level, so that demonstrations (made at the top) and corrections (at the default level) teach one query.

Reasons avoid the words "price", "title" and "options", and any word before a number ("usb 3.0", "offers 8
ounce"): the realizability check would read them as privileged facts or numbered things the student never saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from leap_dspy.envs.expertise import Expertise
from leap_dspy.envs.webshop import vocab
from leap_dspy.envs.webshop.pages import BACK_TO_SEARCH, END_BUTTON, NEXT_PAGE, PREV_PAGE, SEP, SUB_PAGES
from leap_dspy.types import PrivilegedState, StudentInputs

_ASIN = re.compile(r"^B0[0-9A-Z]{8}$")
_CLICKED_ASIN = re.compile(r"click\[(B0[0-9A-Z]{8})\]")
_OPTIONS_START = re.compile(r"\bwith (?:" + "|".join(sorted({n for t in vocab.PRODUCT_TYPES for n in t["options"]}))
                            + r"): ")
_OPTION = re.compile(r"(?:^|, and )([a-z]+): (.+?)(?=, and [a-z]+: |, and price lower than|$)")
_LIMIT = re.compile(r"price lower than (\d+(?:\.\d+)?) dollars")
_UNSPEAKABLE = re.compile(r"[a-z]{2,} \d+\.\d")
_NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
PATIENCE = 4
"""Products to open before settling for one that offers less than the instruction names: a step budget of
15 leaves room for about four product pages and the options and purchase of the last."""
_TYPES = sorted(vocab.PRODUCT_TYPES, key=lambda t: -len(t["type"]))
NOT_CLICKED = "not clicked yet"


# ------------------------------------------------------------------------------------------ what is wanted


@dataclass
class Want:
    """What the instruction asks for: a product type, attributes, one value per option, a price bound."""

    kind: str = ""
    attributes: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    limit: float | None = None

    def query(self) -> str:
        """The first search: the instruction's attributes, product type and option values (the search
        indexes options too, so products that offer the values named come first)."""
        return " ".join([*self.attributes, self.kind, *self.options.values()]).strip()

    def queries(self) -> list[str]:
        """Searches to try in turn, all made of the instruction's words."""
        alternatives = [self.query(), " ".join([*self.attributes, self.kind]), self.kind]
        return [q for q in dict.fromkeys(alternatives) if q]


def _has(phrase: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase.lower())}(?![\w-])", text.lower()) is not None


def read_instruction(instruction: str) -> Want:
    """The goal as the student can read it: the type and attributes are the generator's own phrases (its
    public lexicon) found in the instruction; options and the price bound are spelled out after `with`."""
    text = instruction.lower().strip()
    start = _OPTIONS_START.search(text)
    head = text[: start.start()] if start else text.split(", and price lower than")[0]
    tail = text[start.start() + len("with "):] if start else ""
    kind = next((t for t in _TYPES if _has(t["type"], head)), None)
    attributes = [a for a in dict.fromkeys(kind["attributes"]) if _has(a, head)] if kind else []
    attributes.sort(key=lambda a: head.find(a))  # the instruction's order, as the goal section lists them
    options = dict(_OPTION.findall(tail.split(", and price lower than")[0])) if tail else {}
    limit = _LIMIT.search(text)
    return Want(kind=kind["type"] if kind else "", attributes=attributes, options=options,
                limit=float(limit[1]) if limit else None)


def _goal_section(privileged: PrivilegedState) -> dict[str, str]:
    lines = privileged.sections.get("goal", [])
    return dict(line.split(": ", 1) for line in ([lines] if isinstance(lines, str) else lines) if ": " in line)


def want_of(inputs: StudentInputs, privileged: PrivilegedState) -> Want:
    """Level 0 reads the instruction; from level 1 the goal section gives the same facts without parsing."""
    want = read_instruction(inputs.task)
    goal = _goal_section(privileged)
    if goal.get("attributes"):
        want.attributes = [a.strip() for a in goal["attributes"].split(",") if a.strip()]
    if goal.get("options") and goal["options"] != "(none)":
        want.options = dict(part.split(": ", 1) for part in goal["options"].split(", ") if ": " in part)
    bound = re.match(r"(\d+(?:\.\d+)?)", goal.get("price lower than", ""))
    if bound and float(bound[1]) < 1_000_000:
        want.limit = float(bound[1])
    return want


def target_of(privileged: PrivilegedState) -> str | None:
    """The target product's id (level 2+), used only to break ties between equally good results."""
    lines = privileged.sections.get("target product", [])
    for line in [lines] if isinstance(lines, str) else lines:
        if line.startswith("id: "):
            return line.removeprefix("id: ").strip()
    return None


# ------------------------------------------------------------------------------------------- what is seen


@dataclass
class Result:
    asin: str
    title: str
    price: float


@dataclass
class Page:
    """The page as the student's observation shows it (clipped results are left out: the student never saw
    them whole)."""

    kind: str  # search | results | item | sub | done | unknown
    results: list[Result] = field(default_factory=list)
    title: str = ""
    price: float | None = None
    offered: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    clicks: list[str] = field(default_factory=list)
    sub: str = ""


def _price(text: str) -> float | None:
    m = re.search(r"\$(\d+(?:\.\d+)?)", text)
    return float(m[1]) if m else None


def read_page(observation: str) -> Page:
    """Which page the student is on and what it shows, from the text it sees (WebShop's simple mode)."""
    body, _, actions = observation.partition("\nActions: ")
    clicks = re.findall(r"click\[(.*?)\](?:, |$)", actions)
    lines = [line for line in body.splitlines() if not line.startswith("Invalid action: ")]
    chosen = [m[1] for line in lines if (m := re.match(r"You have clicked (.+)\.$", line))]
    tokens = " ".join(line for line in lines if not line.startswith("You have clicked ")).split(SEP)
    tokens = [t.strip() for t in tokens]
    if "search[<keywords>]" in actions:
        return Page("search", clicks=clicks)
    if END_BUTTON in clicks:
        price_at = next((i for i, t in enumerate(tokens) if t.startswith("Price: $")), None)
        title = tokens[price_at - 1] if price_at else ""
        offered = clicks[clicks.index(PREV_PAGE) + 1: clicks.index(SUB_PAGES[0])] if SUB_PAGES[0] in clicks else []
        return Page("item", title=title, price=_price(tokens[price_at]) if price_at else None, offered=offered,
                    chosen=chosen, clicks=clicks)
    if any(t.startswith("Page ") and "Total results" in t for t in tokens):
        results = [Result(t, tokens[i + 1], p) for i, t in enumerate(tokens[:-2]) if _ASIN.match(t)
                   and tokens[i + 2].startswith("$") and (p := _price(tokens[i + 2])) is not None]
        return Page("results", results=results, clicks=clicks)
    if clicks and set(clicks) <= {BACK_TO_SEARCH, PREV_PAGE}:
        return Page("sub", clicks=clicks)
    if tokens and tokens[0].startswith("Thank you for shopping"):
        return Page("done")
    return Page("unknown", clicks=clicks)


def opened(history: str) -> list[str]:
    """Products the student has opened, oldest first (its `Earlier:` line and recent steps name them)."""
    return list(dict.fromkeys(_CLICKED_ASIN.findall(history)))


def searched(history: str) -> list[str]:
    return [q.lower() for q in re.findall(r"search\[(.*?)\]", history)]


# -------------------------------------------------------------------------------------------------- judging


def matched(want: Want, title: str) -> list[str]:
    """The instruction's attributes that a product's name shows."""
    return [a for a in want.attributes if _has(a, title)]


def problems(want: Want, title: str, price: float | None, offered: list[str] | None = None) -> list[str]:
    """What on the page contradicts the instruction: the wrong kind of product, a price over the bound, a
    named option value not offered. Each is a clause a reason can say as it stands."""
    out = []
    if want.kind and not _has(want.kind, title):
        out.append(f"it is not {_article(want.kind)}")
    if want.limit is not None and price is not None and price >= want.limit:
        out.append(f"it costs ${price:.2f}, not lower than {want.limit:.2f} dollars")
    for name, value in want.options.items() if offered is not None else ():
        if value not in offered:
            out.append(f"it offers no {name}: {value}")
    return out


def candidates(want: Want, page: Page, history: str) -> list[Result]:
    """Results on this page that fit the instruction and were not opened yet, best first: those whose name
    shows the most of the instruction's attributes (page order breaks ties, as the student reads it)."""
    seen = set(opened(history))
    fits = [r for r in page.results if r.asin not in seen and not problems(want, r.title, r.price)]
    return sorted(fits, key=lambda r: -len(matched(want, r.title)))


def best_tier(want: Want, page: Page, history: str) -> list[Result]:
    """The candidates the student has no reason to rank apart: equally many attributes in their names."""
    ranked = candidates(want, page, history)
    top = len(matched(want, ranked[0].title)) if ranked else 0
    return [r for r in ranked if len(matched(want, r.title)) == top]


def _plural(kind: str) -> bool:
    return kind.endswith("s") and not kind.endswith("ss")


def _article(kind: str) -> str:
    if _plural(kind) or kind.endswith("pasta"):
        return kind
    return ("an " if kind[0] in "aeiou" else "a ") + kind


# --------------------------------------------------------------------------------------------------- policy


def choose(want: Want, page: Page, history: str, target: str | None = None) -> str | None:
    """The policy every level plays: the step the student's view supports, the target (when known) only
    breaking a tie among results the student could not rank apart."""
    if page.kind == "search":
        queries, used = want.queries() or ["product"], searched(history)
        return f"search[{next((q for q in queries if q not in used), queries[0])}]"
    if page.kind == "results":
        tier = best_tier(want, page, history)
        if tier:
            return f"click[{next((r for r in tier if r.asin == target), tier[0]).asin}]"
        return f"click[{NEXT_PAGE if NEXT_PAGE in page.clicks else BACK_TO_SEARCH}]"
    if page.kind == "item":
        if problems(want, page.title, page.price, page.offered) and not settles(want, page, history):
            return f"click[{PREV_PAGE}]"
        missing = list(unclicked(want, page).values())
        return f"click[{missing[0] if missing else END_BUTTON}]"
    if page.kind == "sub":
        return f"click[{PREV_PAGE}]"
    return None


def unclicked(want: Want, page: Page) -> dict[str, str]:
    """The option values the instruction names that the page offers and does not say are clicked: what the
    policy selects next and what its reasons say is left, from one rule."""
    return {k: v for k, v in want.options.items() if _status(v, page) == NOT_CLICKED}


def _status(value: str, page: Page) -> str:
    """Whether the page says `value` is clicked, offers it still, or does not offer it: the one rule behind
    `unclicked` and the marks a reason puts after each value the instruction names."""
    return "clicked" if value in page.chosen else NOT_CLICKED if value in page.offered else "not offered"


def settles(want: Want, page: Page, history: str) -> bool:
    """Whether to buy this item although it lacks an option value the instruction names: it is the right
    kind at the right price, and the history shows `PATIENCE` products opened (this one included)."""
    return len(opened(history)) >= PATIENCE and not problems(want, page.title, page.price)


def _same_kind(a: str, b: str, page: Page) -> bool:
    """Two steps that differ only in a choice the page leaves open: which of two products to open, which
    of the instruction's option values to select first."""
    (ka, xa), (kb, xb) = _split(a), _split(b)
    if ka != "click" or kb != "click":
        return False
    if page.kind == "results":
        return xa == xb or (bool(_ASIN.match(xa)) and bool(_ASIN.match(xb)))
    return xa == xb or (xa in page.offered and xb in page.offered)


def _split(action: str) -> tuple[str, str]:
    m = re.match(r"^\s*(search|click)\s*\[(.*)\]\s*$", action, flags=re.IGNORECASE | re.DOTALL)
    return (m[1].lower(), m[2].strip()) if m else ("", action.strip())


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _bound(want: Want) -> str:
    return f"lower than {want.limit:.2f} dollars" if want.limit is not None else "at any price"


def _described(want: Want, title: str) -> str:
    """`a cruelty free, travel size lipstick`: the product as the instruction would name it, from its name."""
    shown = [a for a in matched(want, title) if speakable(a)]
    kind = want.kind or "product"
    return _article(f"{', '.join(shown)} {kind}" if shown else kind)


def speakable(phrase: str) -> bool:
    """Whether a reason can name `phrase` as it stands: the realizability check reads "usb 3.0" as the
    numbered thing "usb 3", which the student never saw, so phrases with a decimal after a word are left out."""
    return _UNSPEAKABLE.search(phrase) is None


def _count(n: int) -> str:
    """A number in words: "opened four products", since "opened 4" reads as a numbered thing to the check."""
    return _NUMBERS[n] if n < len(_NUMBERS) else "many"


# -------------------------------------------------------------------------------------------------- reasons


def _search_reason(want: Want, query: str, history: str) -> str:
    before = searched(history)
    if before:
        said = f" for {before[-1]}" if speakable(before[-1]) else ""
        words = query if speakable(query) else "fewer words"
        return f"The results{said} had nothing left that fits: I search for {words}."
    asked = _article(want.kind or "product")
    attributes = [a for a in want.attributes if speakable(a)]
    if attributes:
        asked += f" that {'are' if _plural(want.kind) else 'is'} {_and(attributes)}"
    if want.options:
        asked += " with " + " and ".join(f"{k}: {v}" for k, v in want.options.items())
    return f"The instruction asks for {asked}: I search for its words."


def _results_reason(want: Want, page: Page, history: str, arg: str) -> str:
    result = next((r for r in page.results if r.asin == arg), None)
    if result is not None:
        trouble = problems(want, result.title, result.price)
        if trouble:
            return f"{arg}: {_and(trouble)}, but I open it to look."
        return f"{arg} is {_described(want, result.title)} at ${result.price:.2f}, {_bound(want)}: I open it."
    if arg in (NEXT_PAGE, BACK_TO_SEARCH):
        what = f"{_article(want.kind or 'product')} {_bound(want)}"
        if arg == NEXT_PAGE:
            return f"No result here that I have not opened is {what}: I look at the next page."
        return f"No result here that I have not opened is {what}, and there is no next page: I search again."
    if arg == PREV_PAGE:
        return "I go back to the previous page of results."
    return f"I open {arg} to look."


def _checked(want: Want, page: Page, trouble: list[str]) -> str:
    """What every item-page reason says first: the page's "You have clicked" lines word for word, then each
    option value the instruction names with whether it is clicked, then which are left and what contradicts the
    instruction. A small student copies consecutive lines reliably where it dropped the second value of a list
    it had to join ("red and medium"), and checks one value at a time where it wrote a set difference by
    position ("I have clicked pink; ...; pink not clicked yet"); the decision it then reads off what it wrote."""
    if not want.options:
        head = "The instruction names no option to select"
    else:
        status = {v: _status(v, page) for v in want.options.values()}
        asked = _and([f"{k}: {v} ({status[v]})" for k, v in want.options.items()])
        left = [v for v, s in status.items() if s == NOT_CLICKED]
        done = all(s == "clicked" for s in status.values())
        said = " ".join(f"You have clicked {v}." for v in page.chosen) if page.chosen else "Nothing is clicked."
        head = (f"The page says: {said} The instruction asks for {asked}; " +
                (f"{_and(left)} not clicked yet" if left else
                 "all of them clicked" if done else "the rest not offered"))
    return f"{head}; {_and(trouble)}" if trouble else head


def _item_reason(want: Want, page: Page, history: str, arg: str) -> str:
    trouble = problems(want, page.title, page.price, page.offered)
    checked = _checked(want, page, trouble)
    if arg in (PREV_PAGE, BACK_TO_SEARCH):
        return f"{checked}: I go back to {'the results' if arg == PREV_PAGE else 'search'}."
    if trouble and settles(want, page, history):
        checked += f", but I have opened {_count(len(opened(history)))} products and it is the closest"
    if arg == END_BUTTON:
        price = f"costs ${page.price:.2f}, {_bound(want)}" if page.price is not None else "fits"
        return f"{checked}: this is {_described(want, page.title)}, it {price}: I buy it."
    if arg in SUB_PAGES:
        return f"I read the {arg.lower()} to check what the name does not show."
    name = next((k for k, v in want.options.items() if v == arg), None)
    return f"{checked}: I select {f'{name}: {arg}' if name else arg}."


def _contrast(want: Want, page: Page, history: str, student: str, action: str) -> str:
    """Why not the student's step, when the page says so (a sentence, or "" when there is nothing to say)."""
    kind, arg = _split(student)
    if not student or student.strip().lower() == action.strip().lower():
        return ""
    if page.kind == "item" and arg in (PREV_PAGE, BACK_TO_SEARCH) and not problems(
            want, page.title, page.price, page.offered):
        return "Nothing on this page contradicts the instruction, so I do not go back."
    if page.kind == "item" and arg == END_BUTTON:
        missing = [f"{k}: {v}" for k, v in unclicked(want, page).items()]
        if missing:
            return f"Buying now would leave {_and(missing)} unselected."
    if page.kind == "item" and arg in page.offered and arg not in want.options.values():
        return f"The instruction does not ask for {arg}."
    if page.kind == "item" and arg in page.chosen:
        return f"The page says I have clicked {arg} already: clicking it again changes nothing."
    if page.kind == "results" and arg in {r.asin for r in page.results}:
        result = next(r for r in page.results if r.asin == arg)
        trouble = problems(want, result.title, result.price)
        if trouble:
            return f"Not {arg}: {_and(trouble)}."
        if arg in opened(history):
            return f"I already opened {arg}."
        return f"{arg}'s name shows less of what the instruction asks for."
    if page.kind == "results" and arg in (NEXT_PAGE, BACK_TO_SEARCH) and candidates(want, page, history):
        return "A result on this page fits the instruction, so I do not leave it."
    if kind == "search" and page.kind != "search":
        return "There is no search box on this page."
    return ""


def reason_for(want: Want, page: Page, history: str, action: str, student: str = "") -> str:
    """A one- or two-sentence reason for `action` naming only the instruction, the page and the history."""
    kind, arg = _split(action)
    if kind == "search":
        reason = _search_reason(want, arg, history)
    elif page.kind == "results":
        reason = _results_reason(want, page, history, arg)
    elif page.kind == "item":
        reason = _item_reason(want, page, history, arg)
    elif page.kind == "sub" and arg == PREV_PAGE:
        reason = "This page only describes the item: I go back to it."
    else:
        reason = f"I {action}, the next step the instruction needs."
    # The contrast comes last: a reason starts as the demonstrations' reason for the same action does, since the
    # student's first words decide its action ("The page says..." fed "The instruction asks for X: I select it").
    contrast = _contrast(want, page, history, student, action)
    return f"{reason} {contrast}" if contrast else reason


# ------------------------------------------------------------------------------------------------ expertise


class WebShopExpertise(Expertise):
    """The scripted expert at every level: `choose` below the top; at the top the oracle wherever its step is
    justified by what the student sees, else `choose` (the oracle's other steps rest on the hidden target)."""

    levels = (0, 1, 2)
    state_at_top = True
    """At the top it reads the goal and target sections too: to judge the oracle's step and play `choose`."""

    def _view(self, inputs: StudentInputs, privileged: PrivilegedState) -> tuple[Want, Page]:
        return want_of(inputs, privileged), read_page(inputs.observation)

    def act(self, inputs: StudentInputs, privileged: PrivilegedState, student_action: str) -> str | None:
        want, page = self._view(inputs, privileged)
        oracle = privileged.oracle_action
        policy = choose(want, page, inputs.history, target_of(privileged))
        if oracle and policy and _same_kind(oracle, policy, page) and not self.unjustified(inputs, privileged, oracle):
            return oracle
        return policy or oracle

    def explain(self, inputs: StudentInputs, privileged: PrivilegedState, action: str,
                student_action: str = "") -> str:
        want, page = self._view(inputs, privileged)
        return reason_for(want, page, inputs.history, action, student_action)

    def unjustified(self, inputs: StudentInputs, privileged: PrivilegedState, action: str) -> str | None:
        """A step the student's view cannot support: a search with words the instruction lacks, a result
        other than the best-fitting ones, or leaving a page that still has a fit, are choices only the hidden
        target explains."""
        want, page = self._view(inputs, privileged)
        kind, arg = _split(action)
        if kind == "search":
            extra = [w for w in re.findall(r"[\w.-]+", arg.lower()) if not _has(w, inputs.task)]
            return f"searches for {', '.join(extra[:3])}, words the instruction does not use" if extra else None
        if page.kind == "results":
            tier = best_tier(want, page, inputs.history)
            if _ASIN.match(arg) and arg not in {r.asin for r in tier}:
                better = f"{tier[0].asin} fits the instruction's words better" if tier else "nothing marks it out"
                return f"opens {arg} while {better}: only the hidden target tells them apart"
            if arg in (NEXT_PAGE, BACK_TO_SEARCH, PREV_PAGE) and tier:
                return f"leaves the results while {tier[0].asin} fits the instruction"
        if page.kind == "item":
            if arg in (PREV_PAGE, BACK_TO_SEARCH) and not problems(want, page.title, page.price, page.offered):
                return "leaves an item that fits everything the instruction names: only the hidden target says no"
            if arg in (PREV_PAGE, BACK_TO_SEARCH) and settles(want, page, inputs.history):
                return "leaves the closest item after opening enough others: only the hidden target says no"
            if arg in page.offered and arg not in want.options.values():
                return f"selects {arg}, which the instruction does not name"
        # The oracle's plan is a list of buttons, not a fact about the shop: a step of it that the page offers
        # is as visible to the student as any other button, so only the facts are checked.
        facts = {k: v for k, v in privileged.sections.items() if k != "oracle plan"}
        return super().unjustified(inputs, PrivilegedState(level=privileged.level, sections=facts), action)
