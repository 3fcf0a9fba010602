"""Where a workload's CPU time goes by operation: `torch.profiler`'s self time, grouped into kinds one can act on
(the frozen weights' matmuls, LoRA's rank-r ones, the vocabulary-wide head, attention, elementwise work, the
optimizer), for `bench/train.py --profile` and `bench/rollout.py --profile`. The profiler's own cost per call
(~10 us) lands mostly in "outside operators": where calls are many and small, read that share as an upper bound."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

MATMULS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::dot"}
ATTENTION = ("scaled_dot_product", "flash_attention", "softmax", "aten::bmm", "aten::baddbmm")
"""Attention's own kernels, and the batched matmuls of eager attention (linear layers multiply with mm/addmm)."""


def _kind(name: str, shapes: list[Any], rank: int | None, vocab: int | None) -> str:
    """One event's kind, from its operator name and (for matmuls) its input shapes."""
    dims = {d for shape in shapes if isinstance(shape, list | tuple) for d in shape if isinstance(d, int)}
    if name in MATMULS:
        if vocab is not None and vocab in dims:
            return "matmul: vocabulary head"
        if rank is not None and rank in dims:
            return f"matmul: LoRA (rank {rank})"
        return "matmul: model weights"
    if any(part in name for part in ATTENTION):
        return "attention"
    if "_foreach" in name or "adam" in name.lower():
        return "optimizer"
    if name.startswith("aten::"):
        return "elementwise, norms, copies"
    return "other operators (autograd, framework)"


@contextlib.contextmanager
def op_profile(rank: int | None = None, vocab: int | None = None) -> Iterator[list[tuple[str, float, int]]]:
    """Profile the block on the CPU; afterwards the yielded list holds (kind, self seconds, calls), largest
    first, with the block's wall time outside any operator. `rank` and `vocab` tell LoRA's and the head's
    matmuls from the rest by their shapes."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    rows: list[tuple[str, float, int]] = []
    start = time.perf_counter()
    # every thread: the engine's forward passes run on its batcher thread, started before the profiler
    every_thread = _ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, experimental_config=every_thread) as prof:
        yield rows
    wall = time.perf_counter() - start
    totals: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = _kind(event.key, list(event.input_shapes or []), rank, vocab)
        slot = totals.setdefault(kind, [0.0, 0])
        slot[0] += event.self_cpu_time_total / 1e6
        slot[1] += event.count
    inside = sum(seconds for seconds, _ in totals.values())
    totals["outside operators (python, framework)"] = [max(0.0, wall - inside), 0]
    rows.extend(sorted(((k, s, int(n)) for k, (s, n) in totals.items()), key=lambda r: -r[1]))


def format_profile(rows: list[tuple[str, float, int]], title: str) -> str:
    """The profile as a small text table with each kind's share of the profiled self time."""
    total = sum(seconds for _, seconds, _ in rows) or 1.0
    width = max([len(kind) for kind, _, _ in rows] + [len(title)])
    lines = [f"{title:<{width}}  {'self s':>8}  {'share':>6}  {'calls':>9}"]
    lines += [f"{kind:<{width}}  {seconds:8.1f}  {seconds / total:6.1%}  {calls:9,d}" for kind, seconds, calls in rows]
    return "\n".join(lines)
