"""The best dense matmul rate torch reaches on this machine: the compute limit that the benchmarks' fractions
("compute", "tokens/s x 6 x params / best") are taken against, measured in the same run as what they divide."""

from __future__ import annotations

import time


def peak_dtypes(device: str = "cpu") -> list[str]:
    """float32, and bfloat16 where the models would run in it: CUDA, or a CPU with bf16 units. Elsewhere torch
    emulates bf16 matmuls at a small fraction of float32's rate (minutes for a 4096² one), and "auto" picks
    float32 anyway."""
    from leap_dspy.lm.models import cpu_supports_bf16

    return ["float32", "bfloat16"] if device == "cuda" or cpu_supports_bf16() else ["float32"]


def best_matmul_flops(dtype: str, sizes: tuple[int, ...], *, repeats: int = 3, device: str = "cpu",
                      threads: int | None = None) -> tuple[float, int]:
    """(best FLOP/s, its size) over square matmuls of each size, best of `repeats` timings after a warm-up,
    each timing long enough (~2 GFLOP) to be read; `threads` sets torch's CPU threads for the measurement."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best, best_n = 0.0, 0
    try:
        for n in sizes:
            a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
            b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
            torch.matmul(a, b)  # warm-up: allocation, kernel choice
            sync()
            reps = max(1, int(2e9 // (2 * n**3)))
            for _ in range(repeats):  # the best: other jobs may share the machine
                start = time.perf_counter()
                for _ in range(reps):
                    torch.matmul(a, b)
                sync()
                flops = 2 * n**3 * reps / (time.perf_counter() - start)
                if flops > best:
                    best, best_n = flops, n
    finally:
        torch.set_num_threads(previous)
    return best, best_n
