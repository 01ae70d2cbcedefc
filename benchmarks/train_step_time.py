"""Training step time of two source trees side by side (issue 21: the memory work must not cost more than 1.15x
the step time before it). Each measurement runs in a fresh process with PYTHONPATH=TREE/src, the trees interleaved
(A, B, A, B, ...); the median over rounds and the ratio B / A are printed and appended as JSON lines to --jsonl.

    python benchmarks/train_step_time.py BEFORE_TREE AFTER_TREE --store STORE --data IN/data \
        --checkpoint IN/sam_vit_b_random.pth --rounds 2

Rows:
- encoder PRESET SIZE BATCH: a SAM image encoder with random weights in train mode, fp32, no checkpointing: forward,
  mean-square of the embedding as the loss, backward, AdamW step (1 warm-up step, the median of --reps steps);
  under autograd the attention is each tree's own (before: SDPA with a float bias mask; after: memeff);
- decoder: `samvit train sam --train decoder --store STORE --batch-size B` (--decoder-batch, default 4) with the
  default masks per image and correction rounds, --steps 3, one log line per step: the median seconds of steps 2
  and 3 (from log.jsonl's images_per_s).
Inputs: `python benchmarks/train_memory.py --prepare IN 8 8` and `samvit embed IN/data/images --checkpoint
IN/sam_vit_b_random.pth --store STORE` (the store must be readable by both trees).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ENCODER_CHILD = r"""
import dataclasses, json, statistics, sys, time
import torch
torch.set_num_threads({threads})
import samvit
from samvit.bench.weights import randomize_
torch.manual_seed(0)
cfg = dataclasses.replace(samvit.preset("{preset}"), img_size={size})
enc = randomize_(samvit.ImageEncoder(cfg), seed=0).train()
opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
x = torch.randn({batch}, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
times = []
for i in range(1 + {reps}):
    t0 = time.perf_counter()
    loss = enc(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 1:
        times.append(time.perf_counter() - t0)
print(json.dumps({{"median_s": statistics.median(times), "times": times}}))
"""


def env_for(tree: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(tree, "src"), OMP_NUM_THREADS=str(threads))
    return env


def encoder_step(python: str, tree: str, preset: str, size: int, batch: int, threads: int, reps: int) -> float:
    """Median seconds of one encoder training step in a fresh process of `tree`."""
    code = ENCODER_CHILD.format(threads=threads, preset=preset, size=size, batch=batch, reps=reps)
    out = subprocess.run([python, "-c", code], env=env_for(tree, threads), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def decoder_step(python: str, tree: str, args: argparse.Namespace) -> float:
    """Median seconds of steps 2 and 3 of a decoder-only `train sam --store` run of `tree`."""
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        subprocess.run([python, "-m", "samvit", "train", "sam", "--data", args.data, "--checkpoint", args.checkpoint,
                        "--train", "decoder", "--store", args.store, "--batch-size", str(args.decoder_batch), "--steps", "3",
                        "--log-every", "1", "--num-workers", "0", "--quiet", "--out", run],
                       env=env_for(tree, args.threads), check=True, capture_output=True, text=True)
        with open(os.path.join(run, "log.jsonl"), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    return statistics.median(args.decoder_batch / r["images_per_s"] for r in rows if r["step"] >= 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--store", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--encoders", default="vit_t:1024:2,vit_b:512:1", help="PRESET:SIZE:BATCH,... ('' for none)")
    p.add_argument("--decoder-batch", type=int, default=4, help="--batch-size of the decoder row (0: no such row)")
    p.add_argument("--jsonl", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "train_step_time.jsonl"))
    args = p.parse_args()
    rows = [("encoder", *e.split(":")) for e in args.encoders.split(",") if e]
    rows += [("decoder", f"batch {args.decoder_batch}")] if args.decoder_batch else []
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in
                    ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")})
    for row in rows:
        times = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name in ("before", "after"):
                tree = getattr(args, name)
                if row[0] == "encoder":
                    t = encoder_step(sys.executable, tree, row[1], int(row[2]), int(row[3]), args.threads, args.reps)
                else:
                    t = decoder_step(sys.executable, tree, args)
                times[name].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        record = {"row": " ".join(row), "before_s": med["before"], "after_s": med["after"],
                  "after_over_before": med["after"] / med["before"], "times": times, "rounds": args.rounds,
                  "threads": args.threads, "flags": flags, "load_average": os.getloadavg(),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": " ".join(["python", "benchmarks/train_step_time.py", *sys.argv[1:]])}
        print(json.dumps(record), flush=True)
        os.makedirs(os.path.dirname(args.jsonl), exist_ok=True)
        with open(args.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
