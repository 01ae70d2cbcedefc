"""Does the collection pipeline keep the encoder busy? Pipeline images/s vs the bare encoder's; store size and reads.

    python benchmarks/bench_extract.py --out benchmarks/results/extract.md

1. Throughput: N distinct JPEGs made from scikit-image photos (flips, crops, rescaled to 1024-1536 px long side)
   are embedded (a) by the bare encoder on tensors preprocessed beforehand, in memory, and (b) by the full pipeline
   `samvit.embeddings.pipeline.embed` into a StoreSink (decode + preprocess in DataLoader workers, sha256, write + fsync + commit into a
   fresh float16 store), same encoder object, batch size and dtype. The encoder is warmed up first; the runs
   alternate (bare, pipeline, bare, pipeline, ...) and the median of each is reported. Pass: ratio >= 0.95.
2. Store: bytes on disk per vit_h embedding (256,64,64) float16 (random tensors, no encoder), and the time to
   read one back with store[key] (page cache warm) and from a freshly opened store.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def make_images(folder: str, n: int) -> None:
    """n distinct JPEGs from scikit-image's offline photos, long side 1024..1536."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(), data.coins(),
              data.moon(), data.hubble_deep_field(), data.immunohistochemistry(), data.retina()]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 8 + 1)), int(rng.integers(0, h // 8 + 1))
        img = img.crop((x0, y0, w - int(rng.integers(0, w // 8 + 1)), h - int(rng.integers(0, h // 8 + 1))))
        if i // len(photos) % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        long_side = 1024 + 64 * (i % 9)
        s = long_side / max(img.size)
        img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)
        img.save(os.path.join(folder, f"img{i:03d}.jpg"), quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_bare(encoder, batches, device, dtype) -> float:
    """Seconds for the encoder alone over prepared CPU batches (host-to-device copy and output to CPU included)."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            encoder(x.to(device=device, dtype=dtype, non_blocking=True)).to(torch.float16).cpu()
    sync(device)
    return time.perf_counter() - t


def bench_pipeline(encoder, items, root, batch_size, workers, run) -> float:
    from samvit.embeddings.pipeline import StoreSink, embed

    path = os.path.join(root, f"store{run}")
    t = time.perf_counter()
    rep = embed(encoder, items, StoreSink(path, checkpoint_sha256="bench"), batch_size=batch_size, workers=workers,
                progress=False)
    elapsed = time.perf_counter() - t
    if rep.embedded != len(items) or rep.failed:
        raise SystemExit(f"pipeline run {run} embedded {rep.embedded} of {len(items)}: {rep.failed}")
    shutil.rmtree(path)
    return elapsed


def bench_store(root: str, n: int = 32) -> dict:
    """Bytes per vit_h float16 embedding on disk and read times (ms)."""
    from samvit import EmbeddingStore

    path = os.path.join(root, "vit_h_store")
    store = EmbeddingStore.create(path, model="vit_h", config={}, embedding_shape=(256, 64, 64),
                                  checkpoint_sha256="0" * 64)
    g = torch.Generator().manual_seed(0)
    with store.writer(model="vit_h", checkpoint_sha256="0" * 64, samvit_version="bench",
                      compute_dtype="float32") as w:
        for i in range(n):
            w.put(f"images/img{i:05d}.jpg", torch.randn((256, 64, 64), generator=g), sha256="f" * 64,
                  original_size=(1500, 2250), input_size=(683, 1024))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    store = EmbeddingStore.open(path)
    rec = store.record(store.keys()[0])
    chunk = os.path.getsize(store._chunk_path(rec["array"], rec["row"]))
    index_bytes = sum(os.path.getsize(os.path.join(path, "index", f)) for f in os.listdir(os.path.join(path, "index")))
    keys = store.keys()
    for k in keys:
        store[k]  # warm the page cache and zarr's array handle
    reads = []
    for _ in range(5):
        for k in keys:
            t = time.perf_counter()
            store[k]
            reads.append(time.perf_counter() - t)
    t = time.perf_counter()
    EmbeddingStore.open(path)[keys[n // 2]]
    fresh = time.perf_counter() - t
    shutil.rmtree(path)
    return {"n": n, "chunk_bytes": chunk, "index_bytes_per_item": index_bytes / n, "bytes_per_item": total / n,
            "read_ms_median": 1e3 * statistics.median(reads), "read_ms_min": 1e3 * min(reads),
            "fresh_open_and_read_ms": 1e3 * fresh}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", help="preset with random weights (default vit_b)")
    p.add_argument("--images", type=int, default=32, help="distinct images (default 32)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (default float32; bfloat16 only where the CPU or GPU has it natively)")
    p.add_argument("--img-size", type=int, default=1024, help="encoder input size (default 1024; smaller for a "
                   "quick check: less compute per image makes hiding decode and write harder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: samvit's default)")
    p.add_argument("--repeats", type=int, default=1, help="alternating bare/pipeline rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=None, help="write the markdown result here as well")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import samvit
    from samvit.embeddings.pipeline import default_workers
    from samvit.data.sources import collect_inputs
    from samvit.runtime import resolve_device, resolve_dtype
    from samvit.data.preprocess import preprocess

    samvit.tune_allocator()
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    workers = default_workers() if args.workers is None else args.workers
    torch.manual_seed(0)
    encoder = samvit.ImageEncoder(samvit.preset(args.model, img_size=args.img_size)).eval().to(device=device,
                                                                                              dtype=dtype)
    root = tempfile.mkdtemp(prefix="samvit-bench-extract-")
    try:
        img_dir = os.path.join(root, "images")
        os.makedirs(img_dir)
        make_images(img_dir, args.images)
        items = collect_inputs([img_dir])
        prepared = [preprocess(pth, args.img_size).tensor for pth, _ in items]
        batches = [torch.stack(prepared[i:i + args.batch_size]) for i in range(0, len(prepared), args.batch_size)]
        del prepared
        print(f"warm-up ({args.model} {args.dtype} on {device}, batch {args.batch_size})...", file=sys.stderr)
        bench_bare(encoder, batches[:1], device, dtype)
        bare, pipe = [], []
        for r in range(args.repeats):
            bare.append(bench_bare(encoder, batches, device, dtype))
            print(f"round {r + 1}: bare {len(items) / bare[-1]:.3f} img/s", file=sys.stderr)
            pipe.append(bench_pipeline(encoder, items, root, args.batch_size, workers, r))
            print(f"round {r + 1}: pipeline {len(items) / pipe[-1]:.3f} img/s", file=sys.stderr)
        st = bench_store(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bare_ips, pipe_ips = len(items) / statistics.median(bare), len(items) / statistics.median(pipe)
    ratio = pipe_ips / bare_ips
    cmd = "python benchmarks/bench_extract.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}" + (f", {torch.cuda.get_device_name(device)}"
                                                        if device.type == "cuda" else ""))
    md = f"""# Extraction pipeline vs bare encoder

Command: `{cmd.strip()}`
Machine: {machine}. Model {args.model} (random weights, input {args.img_size}), {args.dtype}, device {device}, \
batch {args.batch_size},
{len(items)} distinct JPEGs (long side 1024-1536 px), {workers} DataLoader workers, {args.repeats} round(s), median.

| run | seconds | images/s |
|---|---|---|
| bare encoder (tensors preprocessed in memory beforehand) | {statistics.median(bare):.2f} | {bare_ips:.3f} |
| pipeline: decode + preprocess in workers, sha256, write + fsync + commit to a float16 store | \
{statistics.median(pipe):.2f} | {pipe_ips:.3f} |

Pipeline / bare = **{ratio:.3f}** (target >= 0.95: {"PASS" if ratio >= 0.95 else "FAIL"}).

## Store size and read time, vit_h embedding (256, 64, 64) float16

{st['n']} random embeddings written with `EmbeddingStore.writer`, then read back with `store[key]`.

| quantity | value |
|---|---|
| chunk file per embedding | {st['chunk_bytes']} bytes ({st['chunk_bytes'] / 2**20:.3f} MiB) |
| index line per item | {st['index_bytes_per_item']:.0f} bytes |
| whole store / items (zarr.json files, index headers included) | {st['bytes_per_item']:.0f} bytes \
({st['bytes_per_item'] / 2**20:.4f} MiB) |
| read one embedding + metadata, page cache warm (median / min) | {st['read_ms_median']:.2f} ms \
/ {st['read_ms_min']:.2f} ms |
| open the store and read one embedding | {st['fresh_open_and_read_ms']:.2f} ms |
"""
    print(md)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(md)
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
