"""What checking every store read costs: reading a vit_h-sized item (256x64x64 float16, 2 MiB) from an
EmbeddingStore with and without the sha256 check, interleaved in one process, and the two checksums alone
(sha256, which the store already records, and zlib.crc32, a cheaper per-chunk candidate).

    PYTHONPATH=src python benchmarks/store_read_verify.py [--items 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
import zlib

import torch

from samvit.embeddings.store import EmbeddingStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    shape = (256, 64, 64)
    with tempfile.TemporaryDirectory() as d:
        st = EmbeddingStore.create(d + "/s", model="vit_h", config={}, embedding_shape=shape, checkpoint_sha256="x")
        with st.writer(model="vit_h", checkpoint_sha256="x", samvit_version="b", compute_dtype="float32",
                       durable=False) as w:
            for i in range(args.items):
                w.put(f"k{i}", torch.randn(shape), sha256=str(i), original_size=(1024, 1024),
                      input_size=(1024, 1024))
        checked, unchecked = EmbeddingStore.open(d + "/s"), EmbeddingStore.open(d + "/s", verify=False)
        keys = checked.keys()
        for k in keys:  # warm the page cache and zarr's array handles
            unchecked.get(k)
            checked.get(k)
        times = {"read, no check": [], "read + sha256 check": []}
        for _ in range(args.rounds):  # interleaved: the load of other processes hits both alike
            for name, store in (("read, no check", unchecked), ("read + sha256 check", checked)):
                t = time.perf_counter()
                for k in keys:
                    store.get(k)
                times[name].append((time.perf_counter() - t) / len(keys))
        data = unchecked.get(keys[0]).numpy().tobytes()
        for name, fn in (("sha256 alone", lambda: hashlib.sha256(data).hexdigest()),
                         ("crc32 alone", lambda: zlib.crc32(data))):
            runs = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                for _ in range(len(keys)):
                    fn()
                runs.append((time.perf_counter() - t) / len(keys))
            times[name] = runs
    base = statistics.median(times["read, no check"])
    print(f"item {shape} float16 = {len(data) / 2**20:.1f} MiB, {args.items} items, median of {args.rounds} rounds")
    for name, runs in times.items():
        med = statistics.median(runs)
        print(f"  {name:22s} {med * 1e3:7.3f} ms/item  ({med / base:5.2f}x the unchecked read)")


if __name__ == "__main__":
    main()
