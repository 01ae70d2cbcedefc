"""The ViT-B linear layers at 1024 (4096 tokens) as samvit's inference path runs them, against oneDNN's linear with
weights packed once and the neighbour fused as a post-op (GELU into fc1; the residual add into proj and fc2), and
for float32 MKL's packed SGEMM; float32 and bfloat16, interleaved with the in-run matmul peak.

    python benchmarks/bench_linear.py --threads 2 --rounds 5 --out benchmarks/results/linear_vit_b.md
    python benchmarks/bench_linear.py --dtypes float32 ...    # on a CPU without native bfloat16 (its peak: minutes)

Per layer and dtype: "samvit" is modeling/inference.py's own linear_into / add_linear_ (addmm into a buffer, bias
and all; fc1 then GELU in place; proj and fc2 added into the residual stream with addmm_ and the bias after), "onednn packed" is
torch.ops.mkldnn._linear_pointwise on a weight packed by _reorder_linear_weight (GELU as its post-op for fc1; for
proj/fc2 the binary "add" post-op onto the residual), "mkl packed" (float32 only) is torch.ops.mkl._mkl_linear on
a weight packed by _mkl_reorder_linear_weight (what inductor's CPU freezing uses), with the same GELU/add after.
A variant the CPU cannot run (oneDNN's bfloat16 needs AVX-512 or AVX-NE-CONVERT) is recorded as such. The max abs
of each against samvit's own result is beside it; the whole encoder is not timed here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict

import torch

from samvit.bench.runner import machine_info
from samvit.modeling.inference import add_linear_, linear_into
from samvit.modeling.workspace import Workspace

M, C, HID = 4096, 768, 3072
LAYERS = {"qkv": (C, 3 * C, None), "proj": (C, C, "add"), "fc1": (C, HID, "gelu"), "fc2": (HID, C, "add")}


def variants(k: int, n: int, post, dtype: torch.dtype) -> Dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    resid = torch.randn(M, n, generator=g).to(dtype)
    out = torch.empty(M, n, dtype=dtype)
    work = resid.clone()

    linear = torch.nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    ws = Workspace()

    def samvit():  # the inference runner's own functions
        if post == "add":
            work.copy_(resid)  # the residual stream it adds into (the copy is timed in every variant)
            return add_linear_(work, x, linear, ws, "out")
        y = linear_into(x, linear, out)
        return torch.ops.aten.gelu_(y) if post == "gelu" else y

    cands = {"samvit (addmm, then GELU / residual add)": samvit}
    try:
        pw = torch.ops.mkldnn._reorder_linear_weight(w, M)

        def onednn():
            if post == "add":
                work.copy_(resid)
                return torch.ops.mkldnn._linear_pointwise.binary(x, work, pw, b, "add")
            return torch.ops.mkldnn._linear_pointwise(x, pw, b, "gelu" if post == "gelu" else "none", [], "none")

        cands["onednn packed, fused post-op"] = onednn
    except RuntimeError as e:
        cands["onednn packed, fused post-op"] = f"cannot run here: {str(e).splitlines()[0][:120]}"
    if dtype == torch.float32:
        mw = torch.ops.mkl._mkl_reorder_linear_weight(w, M)

        def mkl():
            y = torch.ops.mkl._mkl_linear(x, mw, w, b, M)
            if post == "add":
                work.copy_(resid)
                return work.add_(y)
            return torch.ops.aten.gelu_(y) if post == "gelu" else y

        cands["mkl packed"] = mkl
    return cands


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=None, help="write the markdown here too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = machine_info()
    lines = ["# ViT-B linear layers at 1024 (4096 tokens): samvit's path against packed, fused linears", "",
             f"- machine: {info['cpu']}, {info['cores']} cores, instruction sets: {info['isa_flags']}; torch "
             f"{info['torch']}; {info['date']}; load average {info['load_average']}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- {a.threads} threads, {a.rounds} interleaved rounds, median; share = GFLOP/s over the best in-run "
             "4096^3 matmul of the dtype", ""]
    with torch.inference_mode():
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            A, B = (torch.randn(4096, 4096).to(dtype) for _ in range(2))
            peaks = []
            rows = []
            for layer, (k, n, post) in LAYERS.items():
                cands = variants(k, n, post, dtype)
                runnable = {name: fn for name, fn in cands.items() if callable(fn)}
                ref = runnable["samvit (addmm, then GELU / residual add)"]().float().clone()
                errs = {name: (fn().float() - ref).abs().max().item() for name, fn in runnable.items()}
                times = {name: [] for name in runnable}
                for _ in range(a.rounds):
                    t0 = time.perf_counter()
                    A @ B
                    peaks.append(2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e9)
                    for name, fn in runnable.items():
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                flops = 2 * M * k * n
                for name, fn in cands.items():
                    if not callable(fn):
                        rows.append((layer, name, None, fn))
                        continue
                    s = statistics.median(times[name])
                    rows.append((layer, name, s, f"{errs[name]:.1e}", flops / s / 1e9))
            peak = max(peaks)
            lines += [f"## {dname} (matmul peak {peak:.0f} GFLOP/s)", "",
                      "| layer | variant | ms | GFLOP/s | share of peak | max abs vs samvit |", "|---|---|---|---|---|---|"]
            for r in rows:
                if r[2] is None:
                    lines.append(f"| {r[0]} | {r[1]} | {r[3]} | | | |")
                else:
                    lines.append(f"| {r[0]} | {r[1]} | {r[2] * 1e3:.1f} | {r[4]:.0f} | {r[4] / peak:.2f} | {r[3]} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
