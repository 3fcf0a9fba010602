"""How an inference model's forward pass runs: the attention backend, grouped-query attention on a CPU, and
which side of a linear layer's matmul goes first. Each changes only speed; `prepare_for_inference` applies them
to a loaded model (never to one being trained).
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


def prepare_for_inference(model: Any) -> None:
    """The kernels below, on a model that only generates (its weights already merged)."""
    use_grouped_attention(model)
    use_weight_first_linears(model)


@contextlib.contextmanager
def attention_kernels(device_type: str) -> Iterator[None]:
    """Scaled-dot-product attention without the cuDNN backend, on CUDA.

    PyTorch prefers cuDNN's attention on Hopper, and it builds a graph for every new shape: a decode step (one
    more cached token each time) or a training batch (its own padded length) is always a new shape, and for a
    small model those builds outweigh the attention itself. Flash and memory-efficient attention have no such
    per-shape cost. Elsewhere nothing changes.
    """
    if device_type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


GROUPED_SDPA = "leap_grouped_sdpa"
"""The attention implementation `use_grouped_attention` gives inference models."""


PACKED_QUERIES = 16
"""The most query positions a row (a decode step's token and its draft) whose grouped heads are packed into one
query axis per key/value head; a longer prefill chunk uses `enable_gqa`."""


def _grouped_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' SDPA attention, except on a CPU for several queries a row under a mask, where transformers
    would copy each key/value head for every query head that reads it, and for one query a row without a mask
    (no row padded), where it asks torch's grouped-query kernel, several times slower there in bf16. A few
    queries (a drafted step, or that unmasked one) are packed as transformers packs a masked one-token step: the
    query heads that share a key/value head stacked on one query axis, so each row's cached keys and values are
    read once rather than once per query head. A longer prefill chunk runs with grouped heads (`enable_gqa`)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries = query.shape[2]
    # A masked one-token step transformers packs itself; an unmasked longer one is a causal prefill.
    ours = attention_mask is None if queries == 1 else attention_mask is not None
    if (query.device.type != "cpu" or not ours
            or getattr(module, "num_key_value_groups", 1) == 1 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):  # transformers' own checks and errors for those
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if queries > PACKED_QUERIES or (attention_mask is not None and attention_mask.shape[1] != 1):
        out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
    else:
        kv_heads, groups = key.shape[1], heads // key.shape[1]
        packed = query.reshape(batch, kv_heads, groups * queries, dim)  # query heads are kv-head major
        mask = None
        if attention_mask is not None:  # [b, 1, q, kv], repeated per group
            mask = attention_mask.unsqueeze(2).expand(-1, -1, groups, -1, -1)
            mask = mask.reshape(attention_mask.shape[0], 1, groups * queries, -1)
        out = sdpa(packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.view(batch, heads, queries, dim)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> None:
    """Run an inference model's SDPA attention through `_grouped_sdpa`; other implementations stay as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)


WEIGHT_FIRST_ROWS = 512
"""The most input rows (tokens) a linear layer runs weight-first: past a few hundred the two orders cost the same,
and a prefill's thousands of rows go back to `F.linear`."""


def _weight_first(self: Any, x: Any) -> Any:
    """`nn.Linear.forward` computed as (W x^T)^T for a few rows: the same products, summed in another order."""
    import torch
    import torch.nn.functional as F

    rows = x.numel() // x.shape[-1]
    if rows > WEIGHT_FIRST_ROWS or rows == 0:
        return F.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
    out = out.contiguous() if self.bias is None else out + self.bias
    return out.view(*x.shape[:-1], out.shape[-1])


_FASTER: dict[tuple[Any, ...], bool] = {}  # by weight shape and dtype: a process times each kind of model once


def _weight_first_is_faster(weight: Any, rows: tuple[int, ...] = (4, 64), reps: int = 5) -> bool:
    """Time both orders on the model's widest layer (its LM head) at a few decode-sized row counts: each the
    best of `reps` calls, the two orders taking turns, so that other work on the machine slows both alike."""
    import torch

    key = (tuple(weight.shape), weight.dtype)
    if key in _FASTER:
        return _FASTER[key]
    import torch.nn.functional as F

    def plain(x: Any) -> Any:
        return F.linear(x, weight)

    def first(x: Any) -> Any:
        return torch.mm(weight, x.t()).t().contiguous()

    best = {plain: [float("inf")] * len(rows), first: [float("inf")] * len(rows)}
    with torch.inference_mode():
        inputs = [torch.randn(n, weight.shape[1], dtype=weight.dtype) for n in rows]
        for _ in range(reps + 1):  # the first round warms both up and counts like the others
            for i, x in enumerate(inputs):
                for fn in (plain, first):
                    start = time.perf_counter()
                    fn(x)
                    best[fn][i] = min(best[fn][i], time.perf_counter() - start)
    _FASTER[key] = sum(best[first]) < 0.9 * sum(best[plain])
    return _FASTER[key]


def use_weight_first_linears(model: Any) -> bool:
    """Run an inference model's linear layers weight-first for small inputs, where that measures faster.

    A decode step multiplies a few rows by each weight. On a CPU in float32, MKL computes rows @ W^T (what
    `F.linear` asks for) for a few rows well below its rate and W @ rows^T near it: for SmolLM2-135M's LM head on
    a 2-core AVX2 CPU, 20 ms against 7 ms at 5 rows and 48 ms against 32 ms at 64. Which order wins depends on
    the CPU and its BLAS, so it is timed once, on the model's LM head, before it is used. Returns whether it is.
    """
    import torch

    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not _weight_first_is_faster(weight.detach()):
        log.info("linear layers keep F.linear: weight-first measured no faster on this CPU")
        return False
    log.info("linear layers run weight-first up to %d rows: measured faster on this CPU", WEIGHT_FIRST_ROWS)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_weight_first, module)
    return True
