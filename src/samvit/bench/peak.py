"""This machine's matmul peak: the yardstick for achieved GFLOP/s (bench, benchmarks/ and the docs use it)."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import torch


def matmul_peak(threads: Optional[int] = None, n: int = 4096, max_seconds: float = 5.0, device: str = "cpu",
                repeats: int = 3) -> Dict[str, Any]:
    """Best-of-`repeats` n^3 matmul GFLOP/s in float32 and bfloat16: {dtype: {"gflops", "n"}}.

    On the CPU with `threads` threads (None: as set), and a smaller n where one call would take longer than
    max_seconds (as bfloat16 does on CPUs without native bfloat16 support); on a GPU at n, synchronised.
    """
    if threads:
        torch.set_num_threads(threads)
    on_cpu = torch.device(device).type == "cpu"
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    out: Dict[str, Any] = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 256 if on_cpu else n
        while True:  # grow n while a call stays short enough, up to the asked n
            a, b = (torch.randn(size, size, dtype=dt, device=device) for _ in range(2))
            a @ b
            sync()
            first = _timed(lambda: a @ b, sync)
            if size >= n or first * 8 > max_seconds:
                break
            size *= 2
        best = min([first] + [_timed(lambda: a @ b, sync) for _ in range(repeats - 1)])
        out[name] = {"gflops": 2 * size ** 3 / best / 1e9, "n": size}
    return out


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
