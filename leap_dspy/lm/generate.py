"""Batched token generation over a Hugging Face causal LM, with a hand-written decode loop.

Why not `model.generate`: a small model's decode step on a CPU is short enough that the per-step overhead of
`generate` (logits processors, stopping criteria, cache bookkeeping) is visible, and `generate` cannot reuse a
KV cache that is shared by all rows of a batch. The loop here is small enough to check by eye: greedy or
sampled next tokens, eos and stop strings, early exit when every row is done.

Prefix cache. Rollout prompts share a long head (the chat template's system turn with DSPy's signature
instructions). With `prefix_cache=True` the longest common token prefix of a batch is computed once at batch
size 1 (or taken from a small LRU store of earlier prefixes: KV entries at positions < n depend only on the
first n tokens, so a stored prefix may be truncated or extended), expanded over the batch, and only the
suffixes run through the model. Layout of row i in the KV sequence::

    [shared prefix (p tokens)] [pad ... pad] [suffix_i]

The attention mask zeros the pads, and position ids are given explicitly (p, p+1, ... for the suffix), so
each row sees exactly what it would see unpadded. Greedy outputs match the plain path token for token in
float32 (tests/test_lm.py checks it); in bfloat16 rare near-ties can flip because the matmul shapes differ.

Drafts. With `GenParams.draft_tokens`, greedy decoding feeds each row's next token together with a draft of the
tokens likely to follow (`draft.py`: looked up in the row's prompt and in recent answers) and keeps the drafted
tokens the model's own choices confirm. A forward pass then costs little more than a one-token step where the
step is bound by reading weights and cache rather than by arithmetic (small batches, GPUs), and yields several
tokens. A rejected draft's cache columns stay, masked out like pads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from leap_dspy.lm.draft import Drafter, RowIndex
from leap_dspy.lm.kv_cache import PrefixStore, common_prefix_len, empty_layers, growing_cache, growing_layer_class
from leap_dspy.lm.models import attention_kernels


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
    answers are the same; see the module docstring."""

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
    """Counters for benchmarks: how much prefill the prefix cache saved."""

    batches: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run through the model at prefill (suffixes + new prefix parts)
    output_tokens: int = 0
    prefix_hits: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # the part of `seconds` spent before the first new token
    extra: dict[str, Any] = field(default_factory=dict)


def _ban_repeats(logits: torch.Tensor, generated: list[list[int]], n: int, repeats: int = 1) -> None:
    """Forbid, in each row, every token that would complete an n-gram the row has generated `repeats` times."""
    for i, row in enumerate(generated):
        if len(row) < n - 1:
            continue
        tail = row[len(row) - n + 1:]
        seen = Counter(row[j + n - 1] for j in range(len(row) - n + 1) if row[j:j + n - 1] == tail)
        banned = [token for token, count in seen.items() if count >= repeats]
        if banned:
            logits[i, banned] = float("-inf")


def _length_chunks(lengths: list[int], waste: float) -> list[list[int]]:
    """Row indices grouped by length, shortest first: a chunk grows while padding stays within `waste` of its
    padded size (waste >= 1: one chunk of all rows)."""
    if waste >= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    total = 0
    for row in order:
        n = lengths[row]  # the longest so far: rows come in ascending length
        if chunks and (n * (len(chunks[-1]) + 1) - (total + n)) <= waste * n * (len(chunks[-1]) + 1):
            chunks[-1].append(row)
            total += n
        else:
            chunks.append([row])
            total = n
    return chunks


@dataclass
class _Progress:
    """Per original row, the tokens so far and how the row ended: kept apart from the shrinking tensor batch."""

    tokens: list[list[int]]
    finish: list[str]
    done: list[bool]
    ended_eos: list[bool]

    @classmethod
    def empty(cls, batch: int) -> _Progress:
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


class Generator:
    """Runs batched generation for one loaded model; serialises calls with `lock` (one model, many engines).

    `prefix_cache` turns on the shared-prefix path described in the module docstring; `min_prefix` is the
    shortest common prefix worth the extra forward call. `prefill_waste` bounds the padding of each prefill
    chunk (see `_prefill`); 1.0 prefills the whole batch at once. `draft_budget` caps the tokens one decode step
    feeds when drafts are on (rows x (1 + draft)): past it a step costs about as much per token as prefill and
    a rejected draft is paid in full, so large batches draft less or not at all (default 64 on a CPU, 4096 on
    CUDA, where a step stays bound by reading the weights far longer).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        prefix_cache: bool = True,
        prefix_store_size: int = 8,
        min_prefix: int = 16,
        prefill_waste: float = 0.125,
        draft_budget: int | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.min_prefix = min_prefix
        # Other layer kinds (sliding windows) keep their own layout: those models prefill in one piece.
        growing = growing_layer_class()
        self.full_attention = all(type(layer) is growing for layer in growing_cache(model.config, 1).layers)
        self.prefill_waste = prefill_waste if self.full_attention else 1.0
        self.store = PrefixStore(prefix_store_size)
        self.drafter = Drafter()
        self.draft_budget = draft_budget or (4096 if self.device.type == "cuda" else 64)
        self.lock = lock or threading.Lock()
        self.stats = GenStats()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
        pad = tokenizer.pad_token_id
        self.pad_id: int = int(pad if pad is not None else next(iter(self.eos_ids)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public -------------------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: GenParams, prefix_cache: bool | None = None
    ) -> list[GenResult]:
        """Generate for every prompt (token ids) with the same `params`; order of results = order of prompts.

        `prefix_cache` overrides the generator's default for this call (engines sharing a model may differ).
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        use_prefix = self.prefix_cache if prefix_cache is None else prefix_cache
        with self.lock, torch.inference_mode(), attention_kernels(self.device.type):
            start = time.perf_counter()
            results = self._generate(prompts, params, use_prefix)
            self.stats.seconds += time.perf_counter() - start
        return results

    # -- internals ----------------------------------------------------------------------------------

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV tensors (batch 1) of `prefix`, reusing and extending the longest stored match."""
        from transformers import DynamicCache

        have, kv = self.store.lookup(prefix)
        if have == len(prefix) and kv is not None:
            self.stats.prefix_hits += 1
            return kv
        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config) if kv else DynamicCache(
            config=self.model.config
        )
        rest = torch.tensor([prefix[have:]], dtype=torch.long, device=self.device)
        positions = torch.arange(have, len(prefix), device=self.device).unsqueeze(0)
        self.model(
            input_ids=rest,
            attention_mask=torch.ones(1, len(prefix), dtype=torch.long, device=self.device),
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats.prefill_tokens += len(prefix) - have
        if have:
            self.stats.prefix_hits += 1
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.store.put(prefix, kv)
        return kv

    def _generate(self, prompts: list[list[int]], params: GenParams, use_prefix: bool) -> list[GenResult]:
        """Prefill the batch, decode it, and decode the tokens to text: the whole of one batched call."""
        started = time.perf_counter()
        batch = len(prompts)
        self.stats.batches += 1
        self.stats.rows += batch
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        cache, logits, mask, positions = self._prefill_prompts(prompts, params, use_prefix)
        self.stats.prefill_seconds += time.perf_counter() - started
        # a sliding window counts cache columns, and a rejected draft's columns would narrow it
        if params.greedy and params.draft_tokens > 0 and self.full_attention:
            progress = self._decode_drafted(cache, logits, mask, positions[:, -1:] + 1, params, prompts)
            for answer in progress.tokens:
                self.drafter.remember(answer)
        else:
            progress = self._decode(cache, logits, mask, positions[:, -1:] + 1, params, batch)
        return self._results(prompts, progress, params.stop)

    def _shared_prefix_len(self, prompts: list[list[int]]) -> int:
        """Tokens all prompts share, or 0 if too few to be worth the extra forward call."""
        # Every row keeps at least one suffix token, whose logits give the first new token.
        prefix_len = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        return 0 if prefix_len < self.min_prefix else prefix_len

    def _prefill_prompts(
        self, prompts: list[list[int]], params: GenParams, use_prefix: bool
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the prompts into shared prefix and suffixes and prefill them; return the cache, last logits, the
        attention mask over prefix and suffixes, and the suffixes' position ids."""
        device = self.device
        batch = len(prompts)
        prefix_len = self._shared_prefix_len(prompts) if use_prefix else 0
        suffixes = [p[prefix_len:] for p in prompts]
        width = max(len(s) for s in suffixes)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            mask[row, width - len(suffix):] = 1
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len

        room = width + params.max_new_tokens + 1
        kv = self._prefix_kv(tuple(prompts[0][:prefix_len])) if prefix_len else []
        if prefix_len:
            mask = torch.cat([torch.ones((batch, prefix_len), dtype=torch.long, device=device), mask], dim=1)
        self.stats.prefill_tokens += int(sum(len(s) for s in suffixes))
        cache, logits = self._prefill(suffixes, kv, prefix_len, room)
        return cache, logits, mask, positions

    def _decode(
        self, cache: Any, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, params: GenParams,
        batch: int,
    ) -> _Progress:
        """Choose and feed back one token per row per step until every row is done or the budget is spent."""
        device = self.device
        generator = None
        if not params.greedy and params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        progress = _Progress.empty(batch)
        done = progress.done
        rows = list(range(batch))  # tensor row -> original row; finished rows are dropped as they pile up
        for step in range(params.max_new_tokens):
            if params.no_repeat_ngram > 1:
                _ban_repeats(logits, [progress.tokens[row] for row in rows], params.no_repeat_ngram,
                             params.ngram_repeats)
            nxt = self._choose(logits, params, generator)
            is_eos = torch.isin(nxt, eos)
            self._record(progress, rows, nxt.tolist(), is_eos.tolist(), params)
            if all(done) or step == params.max_new_tokens - 1:
                break
            rows, mask, next_pos, nxt = _drop_finished(cache, rows, done, mask, next_pos, nxt, device)
            feed = nxt.masked_fill(torch.tensor([done[r] for r in rows], device=device), self.pad_id).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(
                input_ids=feed, attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return progress

    def _record(
        self, progress: _Progress, rows: list[int], nxt_list: list[int], eos_list: list[bool], params: GenParams
    ) -> None:
        """Append each live row's new token, and mark the rows that reached eos or a stop string as done."""
        for i, row in enumerate(rows):
            if not progress.done[row]:
                self._take(progress, row, nxt_list[i], eos_list[i], params)

    def _take(self, progress: _Progress, row: int, token: int, is_eos: bool, params: GenParams) -> None:
        """Append one chosen token to a live row, or end the row at eos or at a completed stop string."""
        if is_eos and not params.ignore_eos:
            progress.done[row], progress.finish[row], progress.ended_eos[row] = True, "stop", True
            return
        progress.tokens[row].append(token)
        if params.stop and self._hits_stop(progress.tokens[row], params.stop):
            progress.done[row], progress.finish[row] = True, "stop"

    def _decode_drafted(
        self, cache: Any, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, params: GenParams,
        prompts: list[list[int]],
    ) -> _Progress:
        """Greedy decoding that checks drafts: each step feeds every live row's next token and its draft (pads
        after a shorter one), and keeps the drafted tokens the model's own choices confirm."""
        device, extra = self.device, self.stats.extra
        progress = _Progress.empty(len(prompts))
        index: list[RowIndex | None] = [None] * len(prompts)  # built when a row first drafts
        rows = list(range(len(prompts)))  # tensor row -> original row, as in `_decode`
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

    def _draft(self, index: list[RowIndex | None], prompts: list[list[int]], progress: _Progress, row: int,
               width: int, params: GenParams) -> list[int]:
        """A live row's draft of at most `width` tokens, within its token budget."""
        width = min(width, params.max_new_tokens - len(progress.tokens[row]) - 1)
        if progress.done[row] or width <= 0:
            return []
        if index[row] is None:
            index[row] = self.drafter.row(prompts[row] + progress.tokens[row])
        return self.drafter.draft(index[row], width)

    def _confirm(
        self, logits: torch.Tensor, drafts: list[list[int]], rows: list[int], progress: _Progress,
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
                    _ban_repeats(logits[i, j:j + 1], [progress.tokens[row]], params.no_repeat_ngram,
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

    def _results(self, prompts: list[list[int]], progress: _Progress, stop: tuple[str, ...]) -> list[GenResult]:
        """Each row's text, trimmed at the first stop string (a stop string may span tokens), with its counts."""
        results = []
        for row in range(len(prompts)):
            text = self.tokenizer.decode(progress.tokens[row], skip_special_tokens=True)
            if stop:
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
            result = GenResult(text, progress.tokens[row], len(prompts[row]), progress.finish[row],
                               progress.ended_eos[row])
            self.stats.output_tokens += result.output_tokens
            results.append(result)
        return results

    def _prefill(
        self, suffixes: list[list[int]], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: int,
        room: int,
    ) -> tuple[Any, torch.Tensor]:
        """Run every row's suffix through the model after the shared prefix; return the batch's KV cache, laid
        out as the module docstring draws it, and each row's last logits.

        Rows are prefilled in chunks of similar length, then their KV is placed right-aligned in one batch
        cache. Agent prompts differ in length (history and admissible-action lists vary), and on a CPU a padded
        position costs as much as a real one. Each row's KV is the same wherever it sits (pads are masked out and
        positions are explicit), so decoding is unchanged.
        """
        chunks = self._prefill_chunks(suffixes)
        if len(chunks) == 1:
            cache, logits, _ = self._prefill_chunk(suffixes, chunks[0], prefix_kv, prefix_len, room)
            return cache, logits
        batch = len(suffixes)
        width = max(len(s) for s in suffixes)
        logits: torch.Tensor | None = None
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for chunk in chunks:
            part, last, w = self._prefill_chunk(suffixes, chunk, prefix_kv, prefix_len, 1)
            if logits is None:
                logits = last.new_empty((batch, last.shape[-1]))
                layers = empty_layers(part, batch, prefix_len + width)
            index = torch.tensor(chunk, device=self.device)
            logits[index] = last
            for (keys, values), layer in zip(layers, part.layers, strict=True):
                keys[index, :, prefix_len + width - w:] = layer.keys[:, :, prefix_len:]
                values[index, :, prefix_len + width - w:] = layer.values[:, :, prefix_len:]
        if prefix_len:
            for (keys, values), (k, v) in zip(layers, prefix_kv, strict=True):
                keys[:, :, :prefix_len] = k
                values[:, :, :prefix_len] = v
        assert logits is not None
        return growing_cache(self.model.config, room, layers), logits

    def _prefill_chunks(self, suffixes: list[list[int]]) -> list[list[int]]:
        """Row indices grouped for prefill by `_length_chunks`; counted in the stats for benchmarks."""
        chunks = _length_chunks([len(s) for s in suffixes], self.prefill_waste)
        if len(chunks) == 1:
            chunks = [list(range(len(suffixes)))]  # one piece: the rows in their own order
        self.stats.extra["prefill_chunks"] = self.stats.extra.get("prefill_chunks", 0) + len(chunks)
        return chunks

    def _prefill_chunk(
        self, suffixes: list[list[int]], chunk: list[int], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_len: int, headroom: int,
    ) -> tuple[Any, torch.Tensor, int]:
        """Prefill the rows of one chunk, right-aligned after the shared prefix; return their cache (with
        `headroom` spare positions), their last logits and the chunk's width."""
        device = self.device
        w = max(len(suffixes[row]) for row in chunk)
        ids = torch.full((len(chunk), w), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), prefix_len + w), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for i, row in enumerate(chunk):
            ids[i, w - len(suffixes[row]):] = torch.tensor(suffixes[row], dtype=torch.long)
            mask[i, prefix_len + w - len(suffixes[row]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask[:, prefix_len:].cumsum(-1) - 1).clamp(min=0) + prefix_len
        expanded = [(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in prefix_kv]
        # The last position as an index tensor, not `logits_to_keep=1`: the slice `[:, -1:]` of a longer
        # sequence is not contiguous, and the LM head then runs as a batched matmul over a copy of its
        # weight per row, which costs far more memory and time than the head itself.
        last = torch.tensor([w - 1], device=device)
        cache = growing_cache(self.model.config, headroom, expanded)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=last)
        return cache, out.logits[:, -1, :], w

    def _hits_stop(self, row_tokens: list[int], stop: tuple[str, ...]) -> bool:
        # A stop string completed by the newest token lies within its last few tokens (each >= 1 char).
        window = max(len(s) for s in stop) + 2
        tail = self.tokenizer.decode(row_tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    @staticmethod
    def _choose(logits: torch.Tensor, params: GenParams, generator: torch.Generator | None) -> torch.Tensor:
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
