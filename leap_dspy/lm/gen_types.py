"""What one batched generation call takes, returns and counts: settings, each row's result, the counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenParams:
    """The generation settings that must be equal for requests to share one batched call (hashable)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    no_repeat_ngram: int = 0
    """Never generate an n-gram of this many tokens more than `ngram_repeats` times within one answer (0: off).
    Greedy decoding of a small model can fall into a loop ("the first unvisited is the first unvisited is
    ..."), which spends the whole token budget and leaves nothing to parse; only the generated tokens count,
    never the prompt."""
    ngram_repeats: int = 1
    """How many times one answer may hold such an n-gram: 2 lets an answer say a thing twice (an INTERSECT's
    two halves, a query its reason names) and still cuts a loop at its third turn."""
    draft_tokens: int = 0
    """Greedy decoding only: check up to this many drafted tokens a row at each step (0: one token a step). The
    answers are the same; see `decode.py`'s module docstring."""
    kv_budget: int | None = None
    """The most bytes of KV cache one batch may hold; a larger call runs as several batches, one after another
    (None: the generator's own, see `default_kv_budget`)."""

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass
class GenResult:
    """One row's outcome: the text (trimmed at eos / the first stop string) and real token counts."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    ended_with_eos: bool = False

    @property
    def output_tokens(self) -> int:
        """Tokens the model produced, the eos token included (it cost a decode step like any other)."""
        return len(self.token_ids) + int(self.ended_with_eos)


@dataclass
class GenStats:
    """Counters for benchmarks: how much prefill the prefix cache saved. Prefill and decoding write into the
    generator's one instance: reset it in place, never replace it."""

    batches: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run through the model at prefill (suffixes + new prefix parts)
    output_tokens: int = 0
    prefix_hits: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # the part of `seconds` spent before the first new token
    peak_kv_bytes: int = 0  # the largest KV cache one batch reserved (rows x (prompt + answer room))
    extra: dict[str, Any] = field(default_factory=dict)
