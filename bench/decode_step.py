"""What one decode step costs by batch size and tokens fed a row: the numbers behind the engine's draft budget.

A drafted step feeds each row its next token and a draft (`leap_dspy/lm/decode.py`). Whether that pays depends
on what bounds a step on this machine: where reading the weights and each row's cached keys and values bounds
it, extra tokens a row cost little; where its matmuls bound it, each fed token costs about as much as a row.
The table times the embedded model's forward over a cache of `--context` positions (random keys and values, the
model's own dtype on this machine) for each batch size and tokens a row, with the grouped query heads packed
on one query axis (the engine's way, `kernels.PACKED_QUERIES`) and without (torch's grouped-query attention).

Usage: python bench/decode_step.py [--rows 64 32 16 8] [--fed 1 2 3 5] [--context 450] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from leap_dspy.lm import kernels
from leap_dspy.lm.kv_cache import growing_cache
from leap_dspy.lm.models import DEFAULT_MODEL, load_model


def step_ms(model: Any, rows: int, fed: int, context: int, repeats: int) -> float:
    """The median of `repeats` decode steps feeding `fed` tokens to each of `rows` rows after `context` cached
    positions (one unmeasured step first)."""
    config = model.config
    kv_heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = [(torch.randn(rows, kv_heads, context, dim, dtype=model.dtype),
               torch.randn(rows, kv_heads, context, dim, dtype=model.dtype)) for _ in range(config.num_hidden_layers)]
    cache = growing_cache(config, fed * (repeats + 1), layers)
    mask = torch.ones(rows, context, dtype=torch.long)
    ids = torch.randint(0, config.vocab_size, (rows, fed))
    times = []
    with torch.inference_mode():
        for step in range(repeats + 1):
            start_pos = context + step * fed
            mask = torch.cat([mask, torch.ones(rows, fed, dtype=torch.long)], dim=1)
            positions = torch.arange(start_pos, start_pos + fed).unsqueeze(0).expand(rows, -1)
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                  logits_to_keep=0 if fed > 1 else 1)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 32, 16, 8])
    parser.add_argument("--fed", type=int, nargs="+", default=[1, 2, 3, 5], help="tokens a row a step")
    parser.add_argument("--context", type=int, default=450, help="cached positions a row (an ALFWorld call's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_model(DEFAULT_MODEL)
    kernels.prepare_for_inference(model)
    packed_max = kernels.PACKED_QUERIES
    print(f"\n{DEFAULT_MODEL}, {model.dtype}, {torch.get_num_threads()} threads, {args.context} cached positions a "
          "row; ms a step (packed / grouped-query), and packed ms per fed token")
    print("| rows | tokens a row | packed ms | grouped-query ms | packed / one-token step | ms per token |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        one = 0.0
        for fed in sorted({1, *args.fed}):  # the one-token step first: the ratios are to it
            kernels.PACKED_QUERIES = packed_max
            packed = step_ms(model, rows, fed, args.context, args.repeats)
            kernels.PACKED_QUERIES = 0  # every several-token step back to torch's grouped-query attention
            # one token a row: nothing to pack, the same step either way
            grouped = step_ms(model, rows, fed, args.context, args.repeats) if fed > 1 else packed
            one = one or packed
            print(f"| {rows} | {fed} | {packed:.0f} | {grouped:.0f} | {packed / one:.2f}x | "
                  f"{packed / (rows * fed):.2f} |", flush=True)
    kernels.PACKED_QUERIES = packed_max


if __name__ == "__main__":
    main()
