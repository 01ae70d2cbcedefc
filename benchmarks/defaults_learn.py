"""Defaults that learn, at real size (issue 21; tests/test_train_defaults.py is the same check with tiny models):
each task run with its default learning rate (no --lr, no --blr) for 200 steps on a small folder of photos, and
the loss of the last 10 steps against the first 5.

    python benchmarks/defaults_learn.py --out /tmp/learn --tasks mae,distill,sam

- mae: `samvit train mae --model mae_vit_b --batch-size 8` (MAE ViT-B at 224 px) on the photos;
- distill: `samvit train distill --teacher SAM_VIT_B --student vit_t --batch-size 2` at 1024 px (the teacher's
  embeddings computed once into the run folder);
- sam: `samvit train sam --train decoder --store STORE --batch-size 4` (8 masks per image, 8 correction rounds: the
  defaults) on a mask folder of 8 pictures (benchmarks/train_memory.py --prepare). --sam-batch-size 1 keeps the
  default lr (the floor, 1e-4, at batch 1 and 4 alike) at a quarter of the time: a batch-4 step is 8 masks x 9
  decoder passes x 4 pictures, forward and backward, about 60 s on 2 AVX2 cores.
The teacher / SAM checkpoint is SAM ViT-B with random weights in the official layout (no weights can be downloaded
here): its embeddings are a fixed function of the picture, which is what the student has to learn. The photos are
scikit-image's. Appends one JSON line per task to --jsonl (first, last, ratio, lr, wall time, CPU flags).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat", "brick", "grass", "gravel", "text")


def write_photos(folder: str) -> None:
    """scikit-image's sample photos as PNG files (grey ones as they are)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    for name in PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            try:  # some of them are fetched on first use, which cannot happen without a network
                Image.fromarray(np.asarray(getattr(data, name)()).astype(np.uint8)).save(path)
            except Exception as e:  # noqa: BLE001
                print(f"skipped skimage.data.{name}: {e}")


def samvit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "samvit", *args], check=True)


def losses(run: str):
    with open(os.path.join(run, "log.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="mae,distill,sam")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sam-batch-size", type=int, default=4)
    p.add_argument("--jsonl", default=os.path.join(HERE, "results", "defaults_learn.jsonl"))
    args = p.parse_args()
    sys.path.insert(0, HERE)
    from train_memory import prepare  # the SAM ViT-B random checkpoint and the mask folder

    photos = os.path.join(args.out, "photos")
    write_photos(photos)
    prepare(os.path.join(args.out, "IN"), 8, 8)
    ck = os.path.join(args.out, "IN", "sam_vit_b_random.pth")
    common = ["--steps", str(args.steps), "--log-every", "1", "--ckpt-every", str(args.steps), "--quiet"]
    runs = {"mae": ["train", "mae", "--data", photos, "--model", "mae_vit_b", "--batch-size", "8"],
            "distill": ["train", "distill", "--teacher", ck, "--student", "vit_t", "--data", photos,
                        "--batch-size", "2"],
            "sam": ["train", "sam", "--data", os.path.join(args.out, "IN", "data"), "--checkpoint", ck,
                    "--train", "decoder", "--store", os.path.join(args.out, "store"),
                    "--batch-size", str(args.sam_batch_size)]}
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in
                    ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")})
    for task in args.tasks.split(","):
        run = os.path.join(args.out, task)
        t0 = time.time()
        samvit(*runs[task], *common, "--out", run)
        log = losses(run)
        first = sum(r["loss"] for r in log[:5]) / len(log[:5])
        last = sum(r["loss"] for r in log[-10:]) / len(log[-10:])
        record = {"task": task, "command": "samvit " + " ".join(runs[task] + common), "steps": len(log),
                  "lr": log[0]["lr"], "first5": first, "last10": last, "last_over_first": last / first,
                  "falls_20pct": last <= 0.8 * first, "wall_s": round(time.time() - t0, 1), "flags": flags,
                  "load_average": os.getloadavg(),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        print(json.dumps(record), flush=True)
        os.makedirs(os.path.dirname(args.jsonl), exist_ok=True)
        with open(args.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
