"""Speed of two source trees side by side: ViT-B forward at 1024, batch 1, in float32 and bfloat16, each run in a fresh
process with PYTHONPATH=TREE/src, the trees interleaved (A, B, A, B, ...), the median of the rounds reported with
the ratio B / A. Made to check that a refactor leaves the speed unchanged (within 3%); run it on a quiet machine.

    python benchmarks/compare_trees.py /work/main /work/wt/house --threads 2 --rounds 3

Both trees need torch and their own dependencies importable by the running interpreter (--python, default this
one). Each process builds the encoder from random weights (seed 0, the same for both trees: samvit.bench.weights),
runs 2 warm-up forwards, then times --reps forwards (the median is that process's time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import dataclasses, json, statistics, sys, time
import torch
torch.set_num_threads({threads})
import samvit
from samvit.bench.weights import randomize_
cfg = dataclasses.replace(samvit.preset("{model}"), img_size={size})
enc = randomize_(samvit.ImageEncoder(cfg), seed=0).eval().to(getattr(torch, "{dtype}"))
x = torch.randn(1, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for i in range(2 + {reps}):
        t0 = time.perf_counter()
        enc(x)
        if i >= 2:
            times.append(time.perf_counter() - t0)
print(json.dumps({{"samvit": samvit.__file__, "median_s": statistics.median(times), "times": times}}))
"""


def run_once(python: str, tree: str, dtype: str, threads: int, reps: int, model: str = "vit_b",
             size: int = 1024) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"), OMP_NUM_THREADS=str(threads),
               SAMVIT_DTYPE=dtype)
    code = CHILD.format(threads=threads, dtype=dtype, reps=reps, model=model, size=size)
    res = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tree} ({dtype}) failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = os.path.join(os.path.abspath(tree), "src")
    if not os.path.abspath(out["samvit"]).startswith(expected):
        raise SystemExit(f"{tree}: imported samvit from {out['samvit']}, not from {expected}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a", help="the baseline tree (e.g. /work/main)")
    p.add_argument("tree_b", help="the tree to compare (e.g. a worktree)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per tree and dtype, interleaved")
    p.add_argument("--reps", type=int, default=3, help="timed forwards per process (after 2 warm-ups)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--model", default="vit_b", help="a preset (default vit_b)")
    p.add_argument("--img-size", type=int, default=1024, help="input side (default 1024; smaller for a smoke test)")
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(args.tree_b), "src"))
    try:
        from samvit.bench.runner import machine_info
        machine = machine_info()
    except Exception as e:  # the machine line is a courtesy; the timings do not need it
        machine = {"error": str(e)}
    print(json.dumps({"machine": machine, "command": "python " + " ".join(sys.argv)}))
    rows = []
    for dtype in args.dtypes.split(","):
        times = {args.tree_a: [], args.tree_b: []}
        for r in range(args.rounds):
            for tree in (args.tree_a, args.tree_b) if r % 2 == 0 else (args.tree_b, args.tree_a):
                t = run_once(args.python, tree, dtype, args.threads, args.reps, args.model, args.img_size)["median_s"]
                times[tree].append(t)
                print(f"  {dtype} round {r + 1} {tree}: {t:.3f} s", flush=True)
        a, b = statistics.median(times[args.tree_a]), statistics.median(times[args.tree_b])
        rows.append((dtype, a, b))
    print(f"\n{args.model} forward at {args.img_size}, batch 1, {args.threads} threads, median of {args.rounds} fresh processes "
          f"(each the median of {args.reps} forwards)")
    print(f"| dtype | {args.tree_a} (s) | {args.tree_b} (s) | B / A |")
    print("|---|---:|---:|---:|")
    for dtype, a, b in rows:
        print(f"| {dtype} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
