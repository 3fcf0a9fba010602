"""Prefill: a batch of prompts turned into one KV cache and each row's first logits, for the decode loops.

Prefix cache. Rollout prompts share a long head (the chat template's system turn with DSPy's signature
instructions). With the prefix cache on, the longest common token prefix of a batch is computed once at batch
size 1 (or taken from a small LRU store of earlier prefixes: KV entries at positions < n depend only on the
first n tokens, so a stored prefix may be truncated or extended), expanded over the batch, and only the
suffixes run through the model. Layout of row i in the KV sequence::

    [shared prefix (p tokens)] [pad ... pad] [suffix_i]

The attention mask zeros the pads, and position ids are given explicitly (p, p+1, ... for the suffix), so
each row sees exactly what it would see unpadded. Greedy outputs match the plain path token for token in
float32 (tests/test_lm.py checks it); in bfloat16 rare near-ties can flip because the matmul shapes differ.

Length chunks. Agent prompts differ in length (history and admissible-action lists vary), and on a CPU a padded
position costs as much as a real one, so rows are prefilled in chunks of similar length and their KV is then
placed right-aligned in one batch cache. A row's KV is the same wherever it sits, so decoding is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from leap_dspy.lm.kv_cache import PrefixStore, common_prefix_len, empty_layers, growing_cache

if TYPE_CHECKING:
    from leap_dspy.lm.gen_types import GenStats

KV = list[tuple[torch.Tensor, torch.Tensor]]


def length_chunks(lengths: list[int], waste: float, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices grouped by length, shortest first: a chunk grows while padding stays within `waste` of its
    padded size (waste >= 1: any padding) and its padded size within `max_tokens` (None: any size)."""
    if waste >= 1 and max_tokens is None:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    total = 0
    for row in order:
        n = lengths[row]  # the longest so far: rows come in ascending length
        size = n * (len(chunks[-1]) + 1) if chunks else n
        if chunks and (size - (total + n)) <= waste * size and (max_tokens is None or size <= max_tokens):
            chunks[-1].append(row)
            total += n
        else:
            chunks.append([row])
            total = n
    return chunks


@dataclass
class Prefilled:
    """What decoding starts from: the cache, each row's last logits, the attention mask over prefix and suffixes,
    and the suffixes' position ids."""

    cache: Any
    logits: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


class Prefiller:
    """Prefills batches for one model. `min_prefix` is the shortest common prefix worth the extra forward call;
    `waste` bounds the padding of each length chunk (1.0: the whole batch at once) and `chunk_tokens` its
    padded size (None: any)."""

    def __init__(self, model: Any, pad_id: int, stats: GenStats, *, store_size: int = 8, min_prefix: int = 16,
                 waste: float = 0.125, chunk_tokens: int | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stats = stats
        self.store = PrefixStore(store_size)
        self.min_prefix = min_prefix
        self.waste = waste
        self.chunk_tokens = chunk_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, prompts: list[list[int]], room: int, use_prefix: bool) -> Prefilled:
        """Prefill `prompts`, keeping `room` cache positions free after them for the answer."""
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
        kv = self._prefix_kv(tuple(prompts[0][:prefix_len])) if prefix_len else []
        if prefix_len:
            mask = torch.cat([torch.ones((batch, prefix_len), dtype=torch.long, device=device), mask], dim=1)
        self.stats.prefill_tokens += int(sum(len(s) for s in suffixes))
        cache, logits = self._suffixes(suffixes, kv, prefix_len, room)
        return Prefilled(cache, logits, mask, positions)

    def _shared_prefix_len(self, prompts: list[list[int]]) -> int:
        """Tokens all prompts share, or 0 if too few to be worth the extra forward call."""
        # Every row keeps at least one suffix token, whose logits give the first new token.
        prefix_len = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        return 0 if prefix_len < self.min_prefix else prefix_len

    def _prefix_kv(self, prefix: tuple[int, ...]) -> KV:
        """KV tensors (batch 1) of `prefix`, reusing and extending the longest stored match."""
        from transformers import DynamicCache

        have, kv = self.store.lookup(prefix)
        if have == len(prefix) and kv is not None:
            self.stats.prefix_hits += 1
            return kv
        config = self.model.config
        cache = DynamicCache(ddp_cache_data=kv, config=config) if kv else DynamicCache(config=config)
        rest = torch.tensor([prefix[have:]], dtype=torch.long, device=self.device)
        positions = torch.arange(have, len(prefix), device=self.device).unsqueeze(0)
        self.model(input_ids=rest, attention_mask=torch.ones(1, len(prefix), dtype=torch.long, device=self.device),
                   position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        self.stats.prefill_tokens += len(prefix) - have
        if have:
            self.stats.prefix_hits += 1
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.store.put(prefix, kv)
        return kv

    def _suffixes(self, suffixes: list[list[int]], prefix_kv: KV, prefix_len: int, room: int
                  ) -> tuple[Any, torch.Tensor]:
        """Run every row's suffix after the shared prefix, chunk by chunk; return the batch's cache, laid out as
        the module docstring draws it with `room` free positions after it, and each row's last logits."""
        chunks = self._chunks(suffixes)
        if len(chunks) == 1:
            cache, logits, _ = self._chunk(suffixes, chunks[0], prefix_kv, prefix_len, room)
            return cache, logits
        batch = len(suffixes)
        width = max(len(s) for s in suffixes)
        logits: torch.Tensor | None = None
        layers: KV = []
        for chunk in chunks:
            part, last, w = self._chunk(suffixes, chunk, prefix_kv, prefix_len, 0)
            if logits is None:
                logits = last.new_empty((batch, last.shape[-1]))
                layers = empty_layers(part, batch, prefix_len + width, room)
            index = torch.tensor(chunk, device=self.device)
            logits[index] = last
            end = prefix_len + width  # the room for the answer follows
            for (keys, values), layer in zip(layers, part.layers, strict=True):
                keys[index, :, end - w:end] = layer.keys[:, :, prefix_len:]
                values[index, :, end - w:end] = layer.values[:, :, prefix_len:]
        if prefix_len:
            for (keys, values), (k, v) in zip(layers, prefix_kv, strict=True):
                keys[:, :, :prefix_len] = k
                values[:, :, :prefix_len] = v
        assert logits is not None
        return growing_cache(self.model.config, room, layers, filled=prefix_len + width), logits

    def _chunks(self, suffixes: list[list[int]]) -> list[list[int]]:
        """Row indices grouped by `length_chunks`; counted in the stats for benchmarks."""
        chunks = length_chunks([len(s) for s in suffixes], self.waste, self.chunk_tokens)
        if len(chunks) == 1:
            chunks = [list(range(len(suffixes)))]  # one piece: the rows in their own order
        self.stats.extra["prefill_chunks"] = self.stats.extra.get("prefill_chunks", 0) + len(chunks)
        return chunks

    def _chunk(self, suffixes: list[list[int]], chunk: list[int], prefix_kv: KV, prefix_len: int, headroom: int
               ) -> tuple[Any, torch.Tensor, int]:
        """Prefill the rows of one chunk, right-aligned after the shared prefix; return their cache (with
        `headroom` free positions after the chunk), their last logits and the chunk's width."""
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
        # the cache's first write is the prefix when there is one: room for the suffixes too
        cache = growing_cache(self.model.config, headroom + (w if prefix_kv else 0), expanded)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=last)
        return cache, out.logits[:, -1, :], w
