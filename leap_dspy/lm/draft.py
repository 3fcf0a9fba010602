"""Drafts for greedy decoding: the tokens an answer will likely say next, found by lookup, never by a model.

An agent's answer copies a lot: the output format's field headers, an action from the observation's list, the
phrasing of its earlier answers ("the first unvisited is the ..."). For a row whose context (prompt and answer
so far) ends in some n tokens, `Drafter` proposes what followed the latest earlier occurrence of those n tokens:
in the row's own context first, then in recent answers of any row. The decode loop (`decode.py`) feeds a draft
with the row's next token and keeps only the drafted tokens the model's own greedy choices confirm, so a draft
changes how many forward passes an answer takes, never the answer.
"""

from __future__ import annotations

from collections import OrderedDict

SIZES = (4, 3, 2)
"""The n-gram lengths looked up, longest first: a longer match predicts its continuation better."""


class RowIndex:
    """Where each n-gram of one row's context last ended, kept up to date as the row's answer grows."""

    def __init__(self, context: list[int], sizes: tuple[int, ...] = SIZES) -> None:
        self.context = list(context)
        self.sizes = sizes
        self.ends: dict[tuple[int, ...], int] = {}
        for end in range(1, len(self.context)):  # only n-grams that something follows
            self._index(end)

    def _index(self, end: int) -> None:
        for n in self.sizes:
            if end >= n:
                self.ends[tuple(self.context[end - n:end])] = end

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.context.append(token)
            self._index(len(self.context) - 1)

    def follows(self, n: int, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens."""
        end = self.ends.get(tuple(self.context[-n:]))
        return self.context[end:end + k] if end is not None else []


class Drafter:
    """Proposes drafts from a row's own context and from the n-grams of recent answers (an LRU of `capacity`)."""

    def __init__(self, sizes: tuple[int, ...] = SIZES, capacity: int = 65536, longest: int = 8) -> None:
        self.sizes = sizes
        self.capacity = capacity
        self.longest = longest
        self.recent: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()

    def row(self, prompt: list[int]) -> RowIndex:
        return RowIndex(prompt, self.sizes)

    def draft(self, row: RowIndex, k: int) -> list[int]:
        """At most k tokens the row will likely produce next (none when nothing matches)."""
        if k <= 0:
            return []
        for n in self.sizes:
            if len(row.context) <= n:
                continue
            found = row.follows(n, k)
            if found:
                return found
            known = self.recent.get(tuple(row.context[-n:]))
            if known:
                return list(known[:k])
        return []

    def remember(self, answer: list[int]) -> None:
        """Learn what follows each n-gram of a finished answer (the newest answer wins)."""
        for n in self.sizes:
            for i in range(len(answer) - n):
                key = tuple(answer[i:i + n])
                self.recent[key] = tuple(answer[i + n:i + n + self.longest])
                self.recent.move_to_end(key)
        while len(self.recent) > self.capacity:
            self.recent.popitem(last=False)
