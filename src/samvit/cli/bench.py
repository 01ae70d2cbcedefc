"""`samvit bench`: the side-by-side encoder benchmark (samvit.bench; also benchmarks/bench_encoder.py)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, List

from .options import add_quiet

HELP = "time the encoder side by side with segment-anything, timm and transformers"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    return lambda s: [kind(v.strip()) for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.peers import ALLOCATORS, DEFAULT_IMPLS, IMPLS
    from ..config import PRESETS

    p.add_argument("--model", default="vit_b", help=f"preset: {', '.join(PRESETS)} (default vit_b)")
    p.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the preset's, 1024)")
    p.add_argument("--impls", type=_csv(str), default=list(DEFAULT_IMPLS),
                   help=f"comma-separated, from: {', '.join(IMPLS)} (default: {','.join(DEFAULT_IMPLS)})")
    p.add_argument("--compile", action="store_true", help="add samvit-compiled and official-compiled")
    p.add_argument("--dtypes", type=_csv(str), default=["auto"],
                   help="float32, bfloat16 and/or auto (default auto: bfloat16 where this CPU computes it natively, "
                   "AVX512-BF16 or AMX, else float32)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole plan this many times, interleaved; medians over all rounds (default 1)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[1], help="e.g. 1,4 (default 1)")
    p.add_argument("--allocators", type=_csv(str), default=list(ALLOCATORS), help="default,tuned (default both)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--quick", action="store_true", help="1 timed run after 1 warm-up; matmul peak at n=2048")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--force-bf16", action="store_true",
                   help="run bfloat16 even where this CPU has no fast bfloat16 matmul (very slow there)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and markdown")
    p.add_argument("--label", default="", help="a note written at the top of the results (e.g. 'preliminary')")
    add_quiet(p, "no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; prints the markdown table and where the files went."""
    from ..bench.peers import DTYPE_NAMES
    from ..bench.report import markdown, write_results
    from ..bench.runner import run_benchmark
    from ..config import preset

    cfg = preset(args.model)
    if args.img_size:
        cfg = preset(args.model, img_size=args.img_size)
    impls = list(args.impls) + (["samvit-compiled", "official-compiled"] if args.compile else [])
    impls = list(dict.fromkeys(impls))
    dtypes = []
    for d in args.dtypes:
        if d == "auto":
            from ..runtime import auto_dtype

            d = str(auto_dtype("cpu")).replace("torch.", "")
            print(f"samvit bench: --dtypes auto -> {d}")
        if d not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {d!r} for the benchmark; expected float32 or bfloat16")
        dtypes.append(DTYPE_NAMES[d])
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1 or any(b < 1 for b in args.batch_sizes):
        raise ValueError("--threads, --repeats, --rounds and every batch size must be at least 1")
    dtypes = list(dict.fromkeys(dtypes))
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    record = run_benchmark(cfg, impls, dtypes, args.batch_sizes, args.allocators, args.threads, warmup, repeats,
                           args.timeout, args.force_bf16, peak_size=2048 if args.quick else 4096,
                           progress=False if args.quiet else None, label=args.label, rounds=args.rounds)
    js, md = write_results(record, args.out)
    print(markdown(record))
    print(f"wrote {js} and {md}")
    failed = [r for r in record["runs"] if "error" in r]
    return 1 if failed and len(failed) == len(record["runs"]) else 0
