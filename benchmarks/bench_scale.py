"""The engines side by side on one machine: the single-process pipeline vs the Ray Data job, same images, model,
dtype and batch size, both into a fresh float16 store. Run it on a quiet machine (nothing else running).

    python benchmarks/bench_scale.py --images 32 --out benchmarks/results/scale.md

1. N distinct JPEGs (benchmarks/bench_extract.make_images: scikit-image photos, long side 1024-1536) and a
   checkpoint of random ViT weights in the official layout (--model, default vit_b) are written to a temp folder.
2. single: `samvit.embed` (samvit.embeddings.pipeline; DataLoader workers decode, the main process encodes with all
   cores' threads, a writer thread commits) into store A, encoder loaded beforehand (not timed).
3. ray: a local Ray cluster (ray.init(num_cpus=cores)), `samvit.ray.embed_ray`: decode tasks (decode_cpus each),
   ONE encoder actor with cores - decode_cpus CPUs and all cores' torch threads, StoreDatasink into store B. The
   time includes the driver's checks and Ray's scheduling, not ray.init; the actor's encoder load is included
   (a job pays it), and is reported apart from a warm second job over the same images into a third store.
The runs alternate (single, ray, single, ray...) --repeats times; medians are reported, with images/s and the
ratio ray/single (the issue's target: >= 0.85). The stores are checked equal (same keys, max abs 0 at batch 1).
Records the machine (CPU model, ISA flags, cores, load average) and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", help="preset with random weights (default vit_b)")
    p.add_argument("--images", type=int, default=32, help="distinct images (default 32)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=None, help="single process: DataLoader workers (default: "
                   "samvit's default, half the cores)")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="ray: CPUs each decode task reserves")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds (median reported)")
    p.add_argument("--out", default=None, help="write the markdown result here as well")
    args = p.parse_args()

    import ray

    import samvit
    from bench_extract import make_images
    from samvit import EmbeddingStore, ImageEncoder, load_encoder
    from samvit.bench.runner import machine_info
    from samvit.bench.weights import randomize_
    from samvit.checkpoints.registry import checkpoint_sha256
    from samvit.config import preset
    from samvit.data.sources import collect_inputs
    from samvit.embeddings.pipeline import StoreSink, embed
    from samvit.ray import embed_ray

    cores = os.cpu_count() or 1
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        make_images(folder, args.images)
        ckpt = os.path.join(tmp, f"{args.model}.safetensors")
        samvit.save_encoder(randomize_(ImageEncoder(preset(args.model)), seed=0), ckpt)
        sha = checkpoint_sha256(ckpt)
        items = collect_inputs([folder])
        encoder = load_encoder(args.model, ckpt, dtype=args.dtype, img_size=args.img_size)
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        single, cold, warm = [], [], []
        try:
            for r in range(args.repeats):
                out = os.path.join(tmp, f"single{r}.zarr")
                t = time.perf_counter()
                rep = embed(encoder, items, StoreSink(out, sha), batch_size=args.batch_size, workers=args.workers,
                            progress=False)
                single.append(time.perf_counter() - t)
                assert rep.embedded == len(items), rep.failed
                for runs, name in ((cold, f"ray{r}.zarr"), (warm, f"raywarm{r}.zarr")):
                    t = time.perf_counter()
                    rep = embed_ray(ckpt, items, os.path.join(tmp, name), model=args.model, dtype=args.dtype,
                                    img_size=args.img_size, batch_size=args.batch_size, actors=1,
                                    cpus_per_actor=max(1.0, cores - args.decode_cpus), threads_per_actor=cores,
                                    decode_cpus=args.decode_cpus)
                    runs.append(time.perf_counter() - t)
                    assert rep.embedded == len(items), rep.failed
            a, b = EmbeddingStore.open(os.path.join(tmp, "single0.zarr")), EmbeddingStore.open(
                os.path.join(tmp, "ray0.zarr"))
            same_keys = a.keys() == b.keys()
            max_abs = max(float((a.get(k).float() - b.get(k).float()).abs().max()) for k in a.keys())
        finally:
            ray.shutdown()
    n = len(items)
    s, c, w = statistics.median(single), statistics.median(cold), statistics.median(warm)
    result = {"machine": machine, "model": args.model, "img_size": args.img_size, "dtype": args.dtype,
              "batch_size": args.batch_size, "images": n, "single_s": single, "ray_s": cold, "ray_second_job_s": warm,
              "single_images_per_s": n / s, "ray_images_per_s": n / c, "ray_second_job_images_per_s": n / w,
              "ratio_ray_over_single": (n / c) / (n / s), "same_keys": same_keys, "max_abs_diff": max_abs,
              "command": "python " + " ".join(sys.argv)}
    md = f"""## Engines on one machine: single process vs Ray Data

Command: `{result['command']}`

Machine: {machine['cpu']}, {machine['cores']} cores, {machine['isa_flags']}, torch {machine['torch']}, load average \
{machine['load_average']}, {machine['date']}. Model {args.model} (random weights, input {args.img_size}), \
{args.dtype}, batch {args.batch_size}, {n} JPEGs, float16 store; medians of {args.repeats} alternating rounds.

| engine | seconds | images/s | vs single |
|---|---|---|---|
| single process (`samvit embed --store`) | {s:.1f} | {n / s:.3f} | 1.00 |
| Ray Data, 1 actor (`--engine ray`), job incl. actor start | {c:.1f} | {n / c:.3f} | {s / c:.2f} |
| Ray Data, a second job on the warm cluster | {w:.1f} | {n / w:.3f} | {s / w:.2f} |

Stores equal: same keys {same_keys}, max abs difference {max_abs:g}.
"""
    print(md)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n```json\n" + json.dumps(result, indent=2) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
