"""The decode loops: from a prefilled batch to each row's answer tokens, one token a step or several.

One token a step (`Decoder._one_token`): greedy or sampled next tokens, eos and stop strings, the repetition
guard, early exit when every row is done, and finished rows dropped from the batch as they pile up.

Drafts (`Decoder._drafted`, greedy only). Each step feeds a row's next token together with a draft of the tokens
likely to follow (`draft.py`: looked up in the row's prompt and in recent answers) and keeps the drafted tokens
the model's own choices confirm. A forward pass then costs little more than a one-token step where the step is
bound by reading weights and cache rather than by arithmetic (small batches, GPUs), and yields several tokens.
A rejected draft's cache columns stay, masked out like pads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from leap_dspy.lm.draft import Drafter, RowIndex

if TYPE_CHECKING:
    from leap_dspy.lm.gen_types import GenParams, GenStats
    from leap_dspy.lm.prefill import Prefilled


def ban_repeats(logits: torch.Tensor, generated: list[list[int]], n: int, repeats: int = 1) -> None:
    """Forbid, in each row, every token that would complete an n-gram the row has generated `repeats` times."""
    for i, row in enumerate(generated):
        if len(row) < n - 1:
            continue
        tail = row[len(row) - n + 1:]
        seen = Counter(row[j + n - 1] for j in range(len(row) - n + 1) if row[j:j + n - 1] == tail)
        banned = [token for token, count in seen.items() if count >= repeats]
        if banned:
            logits[i, banned] = float("-inf")


def choose(logits: torch.Tensor, params: GenParams, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's next token: the argmax, or a sample under temperature, top-k and top-p."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_scores.softmax(dim=-1) > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Progress:
    """Per original row, the tokens so far and how the row ended: kept apart from the shrinking tensor batch."""

    tokens: list[list[int]]
    finish: list[str]
    done: list[bool]
    ended_eos: list[bool]

    @classmethod
    def empty(cls, batch: int) -> Progress:
        return cls([[] for _ in range(batch)], ["length"] * batch, [False] * batch, [False] * batch)


def _drop_finished(
    cache: Any, rows: list[int], done: list[bool], mask: torch.Tensor, next_pos: torch.Tensor, nxt: torch.Tensor,
    device: torch.device,
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finished rows still cost a full decode step each: once they pile up, drop them from the batch and cache."""
    keep = [i for i, row in enumerate(rows) if not done[row]]
    if len(rows) - len(keep) < max(1, len(rows) // 4):
        return rows, mask, next_pos, nxt
    index = torch.tensor(keep, device=device)
    cache.batch_select_indices(index)
    return [rows[i] for i in keep], mask[index], next_pos[index], nxt[index.to(nxt.device)]


class Decoder:
    """Runs the decode loops for one model. `drafts` allows drafted steps at all (not for sliding-window models:
    a window counts cache columns, and a rejected draft's columns would narrow it); `draft_budget` caps the
    tokens one drafted step feeds (rows x (1 + draft))."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], pad_id: int, stats: GenStats, *,
                 drafts: bool, draft_budget: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.stats = stats
        self.drafts = drafts
        self.draft_budget = draft_budget
        self.drafter = Drafter()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, start: Prefilled, params: GenParams, prompts: list[list[int]],
                 rng: torch.Generator | None) -> Progress:
        """Decode every row of a prefilled batch until it ends or spends `params.max_new_tokens`; sampling draws
        from `rng` (`rng(params)`: one stream for a whole call, however many batches it runs as)."""
        next_pos = start.positions[:, -1:] + 1
        if not (params.greedy and params.draft_tokens > 0 and self.drafts):
            return self._one_token(start.cache, start.logits, start.mask, next_pos, params, len(prompts), rng)
        progress = self._drafted(start.cache, start.logits, start.mask, next_pos, params, prompts)
        for answer in progress.tokens:
            self.drafter.remember(answer)
        return progress

    def rng(self, params: GenParams) -> torch.Generator | None:
        """The random stream a seeded sampling call draws from (None: unseeded or greedy)."""
        if params.greedy or params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed)

    def _one_token(
        self, cache: Any, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, params: GenParams,
        batch: int, generator: torch.Generator | None,
    ) -> Progress:
        """Choose and feed back one token per row per step until every row is done or the budget is spent."""
        device = self.device
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        progress = Progress.empty(batch)
        done = progress.done
        rows = list(range(batch))  # tensor row -> original row; finished rows are dropped as they pile up
        for step in range(params.max_new_tokens):
            if params.no_repeat_ngram > 1:
                ban_repeats(logits, [progress.tokens[row] for row in rows], params.no_repeat_ngram,
                            params.ngram_repeats)
            nxt = choose(logits, params, generator)
            for row, token, is_eos in zip(rows, nxt.tolist(), torch.isin(nxt, eos).tolist(), strict=True):
                if not done[row]:
                    self._take(progress, row, token, is_eos, params)
            if all(done) or step == params.max_new_tokens - 1:
                break
            rows, mask, next_pos, nxt = _drop_finished(cache, rows, done, mask, next_pos, nxt, device)
            feed = nxt.masked_fill(torch.tensor([done[r] for r in rows], device=device), self.pad_id).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=next_pos, cache=cache,
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return progress

    def _take(self, progress: Progress, row: int, token: int, is_eos: bool, params: GenParams) -> None:
        """Append one chosen token to a live row, or end the row at eos or at a completed stop string."""
        if is_eos and not params.ignore_eos:
            progress.done[row], progress.finish[row], progress.ended_eos[row] = True, "stop", True
            return
        progress.tokens[row].append(token)
        if params.stop and self._hits_stop(progress.tokens[row], params.stop):
            progress.done[row], progress.finish[row] = True, "stop"

    def _hits_stop(self, row_tokens: list[int], stop: tuple[str, ...]) -> bool:
        # A stop string completed by the newest token lies within its last few tokens (each >= 1 char).
        window = max(len(s) for s in stop) + 2
        tail = self.tokenizer.decode(row_tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _drafted(
        self, cache: Any, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, params: GenParams,
        prompts: list[list[int]],
    ) -> Progress:
        """Greedy decoding that checks drafts: each step feeds every live row's next token and its draft (pads
        after a shorter one), and keeps the drafted tokens the model's own choices confirm."""
        device, extra = self.device, self.stats.extra
        progress = Progress.empty(len(prompts))
        index: list[RowIndex | None] = [None] * len(prompts)  # built when a row first drafts
        rows = list(range(len(prompts)))  # tensor row -> original row, as in `_one_token`
        drafts: list[list[int]] = [[] for _ in rows]
        logits, fed = logits.unsqueeze(1), 0  # fed: columns the last step added (0: the logits are prefill's)
        while True:
            pending, kept = self._confirm(logits, drafts, rows, progress, index, params)
            if all(progress.done):
                return progress
            if fed:  # a rejected draft's columns are masked out, like pads
                kept_t = torch.tensor(kept, device=device).unsqueeze(1)
                mask[:, -fed:] *= (torch.arange(fed, device=device).unsqueeze(0) <= kept_t).to(mask.dtype)
                next_pos = next_pos + 1 + kept_t
            rows, mask, next_pos, nxt = _drop_finished(
                cache, rows, progress.done, mask, next_pos, torch.tensor(pending), device)
            width = min(params.draft_tokens, self.draft_budget // len(rows) - 1)
            drafts = [self._draft(index, prompts, progress, row, width, params) for row in rows]
            fed = 1 + max(len(d) for d in drafts)
            feed = torch.full((len(rows), fed), self.pad_id, dtype=torch.long)
            block = torch.zeros((len(rows), fed), dtype=mask.dtype)
            for i, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
                if not progress.done[row]:
                    feed[i, 0] = nxt[i]  # on the CPU: `pending` was never moved to the device
                feed[i, 1:1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
                block[i, :1 + len(draft)] = 1
            mask = torch.cat([mask, block.to(device)], dim=1)
            positions = next_pos + torch.arange(fed, device=device).unsqueeze(0)
            logits = self.model(input_ids=feed.to(device), attention_mask=mask, position_ids=positions,
                                cache=cache, use_cache=True, logits_to_keep=0).logits
            extra["decode_steps"] = extra.get("decode_steps", 0) + 1
            extra["drafted"] = extra.get("drafted", 0) + sum(len(d) for d in drafts)

    def _draft(self, index: list[RowIndex | None], prompts: list[list[int]], progress: Progress, row: int,
               width: int, params: GenParams) -> list[int]:
        """A live row's draft of at most `width` tokens, within its token budget."""
        width = min(width, params.max_new_tokens - len(progress.tokens[row]) - 1)
        if progress.done[row] or width <= 0:
            return []
        if index[row] is None:
            index[row] = self.drafter.row(prompts[row] + progress.tokens[row])
        return self.drafter.draft(index[row], width)

    def _confirm(
        self, logits: torch.Tensor, drafts: list[list[int]], rows: list[int], progress: Progress,
        index: list[RowIndex | None], params: GenParams,
    ) -> tuple[list[int], list[int]]:
        """Record each live row's greedy choice at its fed positions for as long as each choice equals the next
        drafted token; return, per row, the token to feed next and how many drafted tokens were kept."""
        greedy = logits.argmax(dim=-1).tolist()
        pending, kept = [], []
        for i, row in enumerate(rows):
            token, confirmed = self.pad_id, 0
            for j in range(len(drafts[i]) + 1):
                if progress.done[row]:
                    break
                token = greedy[i][j]
                if params.no_repeat_ngram > 1:
                    ban_repeats(logits[i, j:j + 1], [progress.tokens[row]], params.no_repeat_ngram,
                                params.ngram_repeats)
                    if logits[i, j, token] == float("-inf"):
                        token = int(logits[i, j].argmax())
                self._take(progress, row, token, token in self.eos_ids, params)
                if index[row] is not None:
                    index[row].extend([token])
                if len(progress.tokens[row]) >= params.max_new_tokens:
                    progress.done[row] = True
                if j == len(drafts[i]) or token != drafts[i][j]:
                    break
                confirmed += 1
            pending.append(token)
            kept.append(confirmed)
        self.stats.extra["kept"] = self.stats.extra.get("kept", 0) + sum(kept)
        return pending, kept
