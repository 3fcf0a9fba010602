"""Batched token generation over a Hugging Face causal LM, with a hand-written decode loop.

Why not `model.generate`: a small model's decode step on a CPU is short enough that the per-step overhead of
`generate` (logits processors, stopping criteria, cache bookkeeping) is visible, and `generate` cannot reuse a
KV cache that is shared by all rows of a batch. Our loops are small enough to check by eye.

The work is split by stage: `prefill.py` turns the prompts into one KV cache (computing their common head once
and chunking them by length), `decode.py` runs the loops that produce the answer tokens (one a step, or several
with drafts), and `Generator` ties them to one model and turns tokens back into text. `gen_types.py` holds what
a call takes, returns and counts.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from leap_dspy.lm.decode import Decoder, Progress
from leap_dspy.lm.gen_types import GenParams, GenResult, GenStats
from leap_dspy.lm.kernels import attention_kernels
from leap_dspy.lm.kv_cache import growing_cache, growing_layer_class
from leap_dspy.lm.prefill import Prefiller


def default_draft_budget(device_type: str, dtype: torch.dtype) -> int:
    """The tokens a decode step may feed by default: as many as keep it bound by reading the weights and the
    cache rather than by arithmetic. 64 on a CPU computing in float32 (a step of 64 rows is already bound by
    its matmuls there); 320 on one with bf16 units, where matmuls are fast enough that 64 rows with a draft of
    4 each cost about twice a one-token step; 4096 on CUDA."""
    if device_type == "cuda":
        return 4096
    return 64 if dtype == torch.float32 else 320


def default_kv_budget(device_type: str, weight_bytes: int) -> int | None:
    """The most bytes one batch's KV cache may take by default on a CPU: four times the weights', at least 1 GiB.
    A bound for the worst case (long prompts, a larger model), not a speed-up: a decode step reads the weights
    once a batch and every row's cache, so each further batch adds one weight read to steps that read at least
    four times that in cache, and a typical agent batch of the embedded model runs whole. A GPU takes the batch
    at once."""
    return None if device_type == "cuda" else max(1 << 30, 4 * weight_bytes)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one position of the KV cache takes over all layers (an upper bound for sliding-window layers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # Latent-attention models (DeepSeek's) cache keys and values of other widths than `head_dim`.
    key_dim = (getattr(text, "qk_nope_head_dim", 0) or 0) + (getattr(text, "qk_rope_head_dim", 0) or 0)
    value_dim = getattr(text, "v_head_dim", None) or head_dim
    return text.num_hidden_layers * kv_heads * ((key_dim or head_dim) + value_dim) * dtype.itemsize


def default_prefill_tokens(device_type: str) -> int | None:
    """The most tokens one prefill forward takes by default: on a CPU a forward over many more than 8k tokens
    runs slower per token (its activations no longer fit the caches, and each is freshly mapped memory); a GPU
    takes the batch at once."""
    return None if device_type == "cuda" else 8192


class Generator:
    """Runs batched generation for one loaded model; serialises calls with `lock` (one model, many engines).

    `prefix_cache` turns on the shared-prefix prefill (`prefill.py`); `min_prefix` is the shortest common prefix
    worth the extra forward call. `prefill_waste` bounds the padding of each prefill chunk; 1.0 prefills the
    whole batch at once; `prefill_tokens` bounds its padded size (default: `default_prefill_tokens`).
    `draft_budget` caps the tokens one decode step feeds when drafts are on (rows x (1 + draft)): past it a step
    costs about as much per token as prefill and a rejected draft is paid in full, so large batches draft less
    or not at all (default: `default_draft_budget`). `kv_budget` bounds the bytes of one batch's KV cache: a
    larger call runs as several batches of similar length, one after another (default: `default_kv_budget`; a
    call's `GenParams.kv_budget` overrides it).
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
        prefill_tokens: int | None = None,
        draft_budget: int | None = None,
        kv_budget: int | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.lock = lock or threading.Lock()
        self.stats = GenStats()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids: set[int] = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
        pad = tokenizer.pad_token_id
        pad_id = int(pad if pad is not None else next(iter(eos_ids)))
        # Other layer kinds (sliding windows) keep their own layout: those models prefill in one piece, undrafted.
        growing = growing_layer_class()
        full_attention = all(type(layer) is growing for layer in growing_cache(model.config, 1).layers)
        chunk_tokens = prefill_tokens or default_prefill_tokens(self.device.type)
        self.prefill = Prefiller(model, pad_id, self.stats, store_size=prefix_store_size, min_prefix=min_prefix,
                                 waste=prefill_waste if full_attention else 1.0,
                                 chunk_tokens=chunk_tokens if full_attention else None)
        dtype = next(model.parameters()).dtype
        budget = draft_budget or default_draft_budget(self.device.type, dtype)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.kv_budget = kv_budget or default_kv_budget(self.device.type, self.weight_bytes)
        self.kv_bytes = kv_bytes_per_token(model.config, dtype)
        self.decode = Decoder(model, tokenizer, eos_ids, pad_id, self.stats, drafts=full_attention,
                              draft_budget=budget)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        results: dict[int, GenResult] = {}
        with self.lock, torch.inference_mode(), attention_kernels(self.device.type):
            start = time.perf_counter()
            self.stats.batches += 1
            self.stats.rows += len(prompts)
            self.stats.prompt_tokens += sum(len(p) for p in prompts)
            room = params.max_new_tokens + 1
            groups = self.groups([len(p) for p in prompts], room, params.kv_budget or self.kv_budget)
            if len(groups) > 1:
                self.stats.extra["kv_groups"] = self.stats.extra.get("kv_groups", 0) + len(groups)
            rng = self.decode.rng(params)  # one stream for the call, however it is split
            for group in groups:
                rows = [prompts[i] for i in group]
                reserved = len(rows) * (max(map(len, rows)) + room) * self.kv_bytes
                self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, reserved)
                began = time.perf_counter()
                prefilled = self.prefill(rows, room, use_prefix)
                self.stats.prefill_seconds += time.perf_counter() - began
                progress = self.decode(prefilled, params, rows, rng)
                del prefilled  # the next group's cache must not meet this one's
                results.update(zip(group, self._results(rows, progress, params.stop), strict=True))
            self.stats.seconds += time.perf_counter() - start
        return [results[i] for i in range(len(prompts))]

    def groups(self, lengths: list[int], room: int, budget: int | None) -> list[list[int]]:
        """Row indices in batches whose KV cache (each row `room` past its prompt) fits `budget` bytes: one batch
        in the rows' own order when the whole call fits, else rows of similar length together, shortest first."""
        if budget is None or len(lengths) * (max(lengths) + room) * self.kv_bytes <= budget:
            return [list(range(len(lengths)))]
        groups: list[list[int]] = [[]]
        for row in sorted(range(len(lengths)), key=lengths.__getitem__):
            width = lengths[row] + room  # the longest so far: rows come in ascending length
            if groups[-1] and (len(groups[-1]) + 1) * width * self.kv_bytes > budget:
                groups.append([])
            groups[-1].append(row)
        return groups

    def _results(self, prompts: list[list[int]], progress: Progress, stop: tuple[str, ...]) -> list[GenResult]:
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
