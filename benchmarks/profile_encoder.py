"""Where the encoder's time goes, per operator category (torch.profiler, self CPU time, shares of the forward),
float32 and bfloat16; and which kernels the GEMMs reach (ONEDNN_VERBOSE / MKL_VERBOSE: AMX or not).

    python benchmarks/profile_encoder.py --threads 2 --out benchmarks/results/profile_vit_b.md
    python benchmarks/profile_encoder.py --dtypes bfloat16 --no-verbose       # the profile alone
    python benchmarks/profile_encoder.py --model tiny --img-size 128          # a quick check of the script

Categories: linear GEMMs (addmm/mm: qkv, proj, MLP), attention GEMMs (bmm/baddbmm outside einsum: scores,
probabilities x v), fused attention (SDPA's CPU flash kernel), softmax, relative-position terms (the einsums and
their GEMMs), elementwise adds/muls (bias chunks, residual), copies and casts (windows, layouts, dtype), LayerNorm,
GELU, convolutions (patch embedding, neck), the rest. Shares are of the summed self CPU time (all threads'
profiler events), so they hold roughly on a busy machine too; the GFLOP/s column does not.

The GEMM check runs one forward per dtype in a fresh process with ONEDNN_VERBOSE=1 and MKL_VERBOSE=1 and lists,
per library, implementation and dtype, how many GEMM calls and FLOPs went where: every large bfloat16 GEMM should
show a `brg_matmul:avx512_core_amx` (or `..._amx_bf16`) implementation on an AMX CPU; float32 GEMMs go to MKL
(sgemm) or oneDNN's avx512 kernels (AMX has no float32 tiles).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import samvit

LINEAR = {"aten::addmm", "aten::addmm_", "aten::mm", "aten::linear", "aten::matmul"}
ATTN_GEMM = {"aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
CATEGORIES = [  # (category, test on the op name); the first that matches wins
    ("fused attention (SDPA)", lambda n: "scaled_dot_product" in n and n != "aten::scaled_dot_product_attention"),
    ("softmax", lambda n: "softmax" in n),
    ("LayerNorm", lambda n: "layer_norm" in n),
    ("GELU", lambda n: "gelu" in n),
    ("convolutions (patch embed, neck)", lambda n: "convolution" in n or "conv2d" in n),
    ("copies and casts (windows, layouts, dtype)", lambda n: n in {
        "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::fill_",
        "aten::constant_pad_nd", "aten::cat", "aten::index", "aten::zero_"}),
    ("elementwise adds and muls (bias chunks, residual, scale)", lambda n: n in {
        "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::sub"}),
]


def categorise(ev) -> str:
    """The category of one profiler event (self time), from its name and whether an einsum encloses it."""
    name = ev.name
    parent, in_einsum = ev.cpu_parent, False
    while parent is not None:
        if parent.name == "aten::einsum":
            in_einsum = True
            break
        parent = parent.cpu_parent
    if in_einsum and (name in ATTN_GEMM or name in LINEAR or name == "aten::einsum"):
        return "relative-position terms (einsum)"
    if name in LINEAR:
        return "linear GEMMs (qkv, proj, MLP)"
    if name in ATTN_GEMM:
        return "attention GEMMs (scores, probs x v)"
    for cat, test in CATEGORIES:
        if test(name):
            return cat
    return "the rest"


def profile_forward(enc: torch.nn.Module, x: torch.Tensor) -> Tuple[Dict[str, Dict[str, float]], float, str]:
    """({category: {"us", "flops"}}, wall seconds without the profiler, top-ops table) for one forward."""
    with torch.inference_mode():
        enc(x)  # warm-up: workspace buffers, oneDNN primitive caches
        t0 = time.perf_counter()
        enc(x)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
            enc(x)
    cats: Dict[str, Dict[str, float]] = defaultdict(lambda: {"us": 0.0, "flops": 0.0})
    for ev in prof.events():
        c = cats[categorise(ev)]
        c["us"] += ev.self_cpu_time_total
        c["flops"] += event_flops(ev)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return dict(cats), wall, table


def event_flops(ev) -> float:
    """The profiler's FLOP count of an event, and for the in-place GEMMs it does not count (addmm_, baddbmm_:
    residual adds, scores onto the bias) 2*batch*M*K*N from the input shapes, unless the event's own GEMM
    children (a per-matrix loop) are counted instead."""
    if ev.flops:
        return float(ev.flops)
    if ev.name not in ("aten::addmm_", "aten::baddbmm_") or any(
            ch.name in LINEAR | ATTN_GEMM for ch in ev.cpu_children):
        return 0.0
    shapes = ev.input_shapes or []
    if len(shapes) < 3 or not shapes[1] or not shapes[2]:
        return 0.0
    a, b = shapes[1], shapes[2]  # (.., M, K) and (.., K, N)
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


_DIMS = re.compile(r"^[0-9x:]+$")


def _gemm_flops(desc: str) -> float:
    """2*batch*M*K*N from a oneDNN matmul / inner product problem description (e.g. '12x4096x64:12x64x4096' or
    'mb4096ic768oc2304')."""
    if _DIMS.match(desc) and ":" in desc:
        src, wei = [list(map(int, p.split("x"))) for p in desc.split(":")[:2]]
        batch = 1
        for d in src[:-2]:
            batch *= d
        return 2.0 * batch * src[-2] * src[-1] * wei[-1]
    m = re.match(r"mb(\d+)ic(\d+)oc(\d+)", desc)
    if m:
        a, b, c = map(int, m.groups())
        return 2.0 * a * b * c
    return 0.0


def gemm_report(model: str, img_size: Optional[int], dtype: str, threads: int, kernel: str) -> Dict[str, object]:
    """One forward in a fresh process with ONEDNN_VERBOSE / MKL_VERBOSE on: GEMM calls grouped by (library,
    implementation, dtype) with their count and FLOPs, and the large ones (>= 0.1 GFLOP) that did not reach AMX."""
    code = "\n".join([
        "import torch, samvit",
        f"torch.set_num_threads({threads})",
        f"cfg = samvit.EncoderConfig(img_size={img_size or 128}, embed_dim=64, depth=4, num_heads=4, window_size=7, "
        f"global_attn_indexes=(1, 3), out_chans=32, name='tiny')" if model == "tiny" else
        f"cfg = samvit.preset({model!r}" + (f", img_size={img_size})" if img_size else ")"),
        f"enc = samvit.ImageEncoder(cfg, kernel={kernel!r}).eval().to(torch.{dtype})",
        f"x = torch.randn(1, 3, cfg.img_size, cfg.img_size, dtype=torch.{dtype})",
        "with torch.inference_mode():  # the inference path (workspace), as in the profile",
        "    enc(x)",
        "    print('=== TIMED FORWARD ===', flush=True)",
        "    enc(x)"])
    env = dict(os.environ, ONEDNN_VERBOSE="1", MKL_VERBOSE="1", DNNL_VERBOSE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    text = res.stdout.split("=== TIMED FORWARD ===", 1)[-1]
    groups: Dict[str, Dict[str, float]] = defaultdict(lambda: {"calls": 0, "gflop": 0.0})
    not_amx: Dict[str, Dict[str, float]] = defaultdict(lambda: {"calls": 0, "gflop": 0.0})
    for line in text.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line:
            f = line.split(",")
            i = f.index("exec")
            kind, impl = f[i + 2], f[i + 3]
            if kind not in ("matmul", "inner_product") and "gemm" not in kind:
                continue
            src = next((p for p in f[i + 5].split() if p.startswith("src")), "src:?")
            dt = src.split(":")[1] if ":" in src else "?"
            key = f"oneDNN {kind} {impl} ({dt})"
            fl = _gemm_flops(f[-2]) / 1e9
        elif line.startswith("MKL_VERBOSE") and "GEMM" in line.split()[1]:
            call = line.split()[1]
            key = f"MKL {call.split('(')[0]}"
            nums = [int(v) for v in re.findall(r"(?<=[,(])(\d+)(?=,)", call)[:3]]
            fl = 2.0 * nums[0] * nums[1] * nums[2] / 1e9 if len(nums) == 3 else 0.0
        else:
            continue
        groups[key]["calls"] += 1
        groups[key]["gflop"] += fl
        if fl >= 0.1 and "amx" not in key:
            not_amx[key]["calls"] += 1
            not_amx[key]["gflop"] += fl
    return {"groups": dict(groups), "large_not_amx": dict(not_amx)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", help="a preset, or 'tiny' (a small config, for checking the script)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--kernel", default="auto", help="attention kernel (default auto)")
    p.add_argument("--no-verbose", action="store_true", help="skip the ONEDNN_VERBOSE / MKL_VERBOSE GEMM check")
    p.add_argument("--verbose-only", action="store_true", help="only the GEMM check (no profile)")
    p.add_argument("--label", default="", help="a line for the report (e.g. 'machine shared: shares indicative')")
    p.add_argument("--out", default=None, help="also write the markdown here (and a .json beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from samvit.bench.runner import machine_info

    if args.model == "tiny":
        cfg = samvit.EncoderConfig(img_size=args.img_size or 128, embed_dim=64, depth=4, num_heads=4, window_size=7,
                                   global_attn_indexes=(1, 3), out_chans=32, name="tiny")
    else:
        cfg = samvit.preset(args.model) if args.img_size is None else samvit.preset(args.model, img_size=args.img_size)
    m = machine_info()
    record: Dict[str, object] = {"machine": m, "config": cfg.to_dict(), "label": args.label, "dtypes": {}}
    lines = [f"# Profile: {cfg.name} at {cfg.img_size}, kernel {args.kernel}, batch 1, {args.threads} threads", "",
             "Command: `python benchmarks/profile_encoder.py "
             f"{shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Machine: {m['cpu']}, {m['cores']} CPUs, {m['isa_flags']}; torch {m['torch']} "
             f"({m['torch_cpu_capability']}); load average {m['load_average']}; {m['date']}."]
    if args.label:
        lines += ["", f"**{args.label}**"]
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        record["dtypes"][dt] = {}
        lines += ["", f"## {dt}"]
        if not args.verbose_only:
            dtype = getattr(torch, dt)
            enc = samvit.ImageEncoder(cfg, kernel=args.kernel).eval().to(dtype)
            x = torch.randn(1, 3, cfg.img_size, cfg.img_size, dtype=dtype)
            cats, wall, table = profile_forward(enc, x)
            del enc
            total = sum(c["us"] for c in cats.values())
            record["dtypes"][dt] = {"wall_s": wall, "categories": cats}
            lines += ["", f"Forward without the profiler: {wall:.2f} s (not a benchmark figure).", "",
                      "| category | share of self CPU time | GFLOP (profiler; in-place GEMMs from shapes) "
                      "| GFLOP/s (self time) |",
                      "|---|---|---|---|"]
            for name, c in sorted(cats.items(), key=lambda kv: -kv[1]["us"]):
                gf = c["flops"] / 1e9
                rate = f"{gf / (c['us'] / 1e6):.0f}" if gf and c["us"] else ""
                lines.append(f"| {name} | {100 * c['us'] / total:.1f}% | {gf:.1f} | {rate} |")
            lines += ["", "Top operators:", "", "```", table, "```"]
        if not args.no_verbose:
            rep = gemm_report(args.model, args.img_size, dt, args.threads, args.kernel)
            record["dtypes"][dt]["gemms"] = rep
            lines += ["", f"GEMMs of one {dt} forward by library and implementation (ONEDNN_VERBOSE=1, "
                      "MKL_VERBOSE=1):", ""]
            if "error" in rep:
                lines.append(f"verbose run failed: {rep['error']}")
            else:
                lines += ["| library, implementation (dtype) | calls | GFLOP |", "|---|---|---|"]
                for k, g in sorted(rep["groups"].items(), key=lambda kv: -kv[1]["gflop"]):
                    lines.append(f"| {k} | {g['calls']} | {g['gflop']:.1f} |")
                big = rep["large_not_amx"]
                lines += ["", "Large GEMMs (>= 0.1 GFLOP) not on an AMX kernel: "
                          + ("none" if not big else "; ".join(f"{k}: {g['calls']} calls, {g['gflop']:.1f} GFLOP"
                                                                for k, g in big.items()))
                          + (" (expected in float32: AMX has no float32 tiles)" if dt == "float32" and big else "")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
