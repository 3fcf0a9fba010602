"""The KV caches batched prefill and decoding (`prefill.py`, `decode.py`) build on: where rows keep keys and values.

- `growing_cache`: a transformers `DynamicCache` whose layers append a step's keys and values into spare room of
  one buffer instead of concatenating the whole cache each step.
- `PrefixStore`: batch-1 caches of earlier prompts' common head (the system turn), reused by later batches: the
  KV entries at positions < n depend only on the first n tokens, so a stored prefix may be truncated or extended.
- `empty_layers`: per-layer buffers (pads zeroed), with room for the answer, that chunked prefill fills row by row and
  the growing cache then adopts as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def growing_cache(config: Any, headroom: int, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  filled: int | None = None) -> Any:
    """A `DynamicCache` whose full-attention layers append into preallocated room (see `_GrowingLayer`).

    `kv` is copied in, unless `filled` is given: then each (keys, values) is a buffer whose first `filled`
    positions hold the cache, and the layers adopt it, so a batch's KV is never held twice."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [growing_layer_class()(headroom) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    for layer, (keys, values) in zip(cache.layers, kv or [], strict=False):
        if filled is None:
            layer.update(keys, values)
        else:
            layer.adopt(keys, values, filled)
    return cache


_GROWING: type | None = None


def growing_layer_class() -> type:
    """`DynamicLayer` concatenates the whole cache with each new token, a copy that at large batches rivals the
    decode step's matmuls. This layer writes the new token into spare room of one
    buffer and hands attention a view of the filled part (same values, same shapes)."""
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    from transformers.cache_utils import DynamicLayer

    class _GrowingLayer(DynamicLayer):
        def __init__(self, headroom: int) -> None:
            super().__init__()
            self.headroom = max(1, headroom)
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            have = self.get_seq_length()
            need = have + key_states.shape[-2]
            buffer = self._k
            if (buffer is None or buffer.shape[-2] < need or buffer.shape[0] != key_states.shape[0]
                    or (have and self.keys.data_ptr() != buffer.data_ptr())):  # batch_select_indices replaced it
                batch, heads, _, dim = key_states.shape
                self._k = key_states.new_empty((batch, heads, need + self.headroom, dim))
                self._v = value_states.new_empty((batch, value_states.shape[1], need + self.headroom,
                                                  value_states.shape[-1]))
                if have:
                    self._k[..., :have, :] = self.keys
                    self._v[..., :have, :] = self.values
            self._k[..., have:need, :] = key_states
            self._v[..., have:need, :] = value_states
            self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
            return self.keys, self.values

        def adopt(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
            """Take `keys`/`values` as this layer's buffers, their first `filled` positions the cache."""
            self.lazy_initialization(keys, values)
            self._k, self._v = keys, values
            self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            # Select from the buffer itself: transformers' select copies the filled part and leaves the old
            # buffer alive until the next step reallocates, so every layer briefly held its cache twice.
            have = self.get_seq_length()
            if have and self._k is not None and self.keys.data_ptr() == self._k.data_ptr():
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[..., :have, :], self._v[..., :have, :]
            else:
                super().batch_select_indices(indices)

    _GROWING = _GrowingLayer
    return _GROWING


def common_prefix_len(seqs: list[list[int]] | list[tuple[int, ...]]) -> int:
    """How many leading tokens all of `seqs` share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for other in seqs[1:]:
        i = 0
        limit = min(n, len(other))
        while i < limit and other[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


class PrefixStore:
    """A small LRU of batch-1 KV caches keyed by their token prefix.

    Lookup returns the stored entry sharing the longest prefix with the asked tokens (truncated to that
    length), so the system turn computed for one batch serves every later batch.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def lookup(self, tokens: tuple[int, ...]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        best_len, best_key = 0, None
        for key in self._entries:
            m = common_prefix_len([key, tokens])
            if m > best_len:
                best_len, best_key = m, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key]
        if best_len < len(best_key):
            kv = [(k[..., :best_len, :], v[..., :best_len, :]) for k, v in kv]
        return best_len, kv

    def put(self, tokens: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not tokens:
            return
        # An entry that is a prefix of the new one is redundant: the new one answers all its lookups.
        for key in [k for k in self._entries if len(k) <= len(tokens) and tokens[: len(k)] == k]:
            del self._entries[key]
        self._entries[tokens] = kv
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def empty_layers(part: Any, batch: int, length: int, room: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) for the whole batch, shaped like the chunk cache `part` but `length` + `room`
    long: the first `length` positions zeroed (a masked pad still enters attention's weighted sum, and 0 x NaN is
    NaN), the room left for decoding to write."""
    layers = []
    for layer in part.layers:
        pair = []
        for t in (layer.keys, layer.values):
            buffer = t.new_empty((batch, t.shape[1], length + room, t.shape[-1]))
            buffer[:, :, :length].zero_()
            pair.append(buffer)
        layers.append((pair[0], pair[1]))
    return layers
