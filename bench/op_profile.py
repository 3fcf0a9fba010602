"""Where a workload's CPU time goes by operation: `torch.profiler`'s self time, grouped into kinds one can act on
(the frozen weights' matmuls, LoRA's rank-r ones, the vocabulary-wide head, attention, elementwise work, the
optimizer), for `bench/train.py --profile` and `bench/rollout.py --profile`. The profiler's own cost per call
(~10 us) lands mostly in "outside operators": where calls are many and small, read that share as an upper bound."""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass
class Profile:
    """Self seconds and calls by kind (with the block's wall time outside any operator), largest first, and the
    operators that took the most self time: the kinds say where to act, the operators what to act on."""

    kinds: list[tuple[str, float, int]] = dataclasses.field(default_factory=list)
    operators: list[tuple[str, float, int]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.kinds)


@contextlib.contextmanager
def op_profile(rank: int | None = None, vocab: int | None = None, top: int = 8) -> Iterator[Profile]:
    """Profile the block on the CPU; afterwards the yielded `Profile` is filled in. `rank` and `vocab` tell
    LoRA's and the head's matmuls from the rest by their shapes; `top` operators are listed by name."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    result = Profile()
    start = time.perf_counter()
    # every thread: the engine's forward passes run on its batcher thread, started before the profiler
    every_thread = _ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, experimental_config=every_thread) as prof:
        yield result
    wall = time.perf_counter() - start
    totals: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = _kind(event.key, list(event.input_shapes or []), rank, vocab)
        for table, key in ((totals, kind), (by_name, event.key)):
            slot = table.setdefault(key, [0.0, 0])
            slot[0] += event.self_cpu_time_total / 1e6
            slot[1] += event.count
    inside = sum(seconds for seconds, _ in totals.values())
    totals["outside operators (python, framework)"] = [max(0.0, wall - inside), 0]
    result.kinds.extend(_largest(totals))
    result.operators.extend(_largest(by_name)[:top])


def _largest(table: dict[str, list[float]]) -> list[tuple[str, float, int]]:
    return sorted(((k, s, int(n)) for k, (s, n) in table.items()), key=lambda r: -r[1])


def format_profile(profile: Profile, title: str) -> str:
    """The profile as small text tables: each kind's share of the profiled time, then the largest operators."""
    total = sum(seconds for _, seconds, _ in profile.kinds) or 1.0
    names = [name for name, _, _ in profile.kinds + profile.operators]
    width = max([len(name) for name in names] + [len(title)])
    def line(name: str, seconds: float, calls: int) -> str:
        return f"{name:<{width}}  {seconds:8.1f}  {seconds / total:6.1%}  {calls:9,d}"

    return "\n".join([f"{title:<{width}}  {'self s':>8}  {'share':>6}  {'calls':>9}",
                      *(line(*row) for row in profile.kinds), "largest operators:",
                      *(line(*row) for row in profile.operators)])
