"""A bounded load test on loopback against `samvit serve` processes (tiny model): concurrent clients with and without
batching, a flood beyond the queue limit (429 + Retry-After, bounded server memory), every accepted answer correct.
Stops by itself: fixed request counts, every wait bounded. Prints the measured figures (run with -s to see them)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import samvit  # noqa: E402

from tests._serve_utils import free_port, object_image, official_tiny_sam_1024, png_bytes, save_full_checkpoint  # noqa: E402

CLIENTS = 8  # = the batch size of the batching server


@contextlib.contextmanager
def serve(ckpt: str, *args: str):
    """`samvit serve` in a subprocess on a free port; yields (base URL, pid) once /healthz answers 200."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "samvit", "serve", "--checkpoint", ckpt, "--port", str(port),
                             "--log-level", "error", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def wait_healthy(url: str, proc, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, proc.stderr.read()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        assert time.monotonic() - t0 < timeout, "server did not start"
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def burst(url: str, bodies, timeout: float = 120):
    """Every body posted at once by its own client (format npy); (responses in order, wall seconds)."""
    out = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(i):
        with httpx.Client(base_url=url, timeout=timeout) as c:
            start.wait()
            out[i] = (time.perf_counter(), c.post("/v1/embeddings", content=bodies[i], params={"format": "npy"}),
                      time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert all(o is not None for o in out), "a client did not finish"
    return [o[1] for o in out], max(o[2] for o in out) - min(o[0] for o in out)


def check(responses, reference: np.ndarray) -> int:
    """Every 200 holds the reference embedding; returns how many were accepted."""
    ok = 0
    for r in responses:
        if r.status_code == 200:
            got = np.load(io.BytesIO(r.content))
            assert got.shape == reference.shape and np.abs(got - reference).max() <= 1e-4
            ok += 1
    return ok


def batch_sizes(url: str):
    text = httpx.get(url + "/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("samvit_encoder")}
    return value["samvit_encoder_batch_size_count"], value["samvit_encoder_batch_size_sum"]


def test_batching_and_overload(tmp_path):
    ckpt = save_full_checkpoint(official_tiny_sam_1024(seed=0), tmp_path / "tiny_sam.safetensors")
    rgb = object_image()
    ref = samvit.Predictor.from_checkpoint(ckpt)
    ref.set_image(rgb)
    reference = ref.get_image_embedding().numpy()
    files = iter(png_bytes(rgb, tag=f"img{i}") for i in range(1000))  # distinct files, same pixels: no cache hits
    # The clients of a round arrive together, so a long max wait fills each batch of 8 without delaying it (it ends
    # when the batch is full); full batches also make the warm-up reach the memory peak the flood is compared with.
    with serve(ckpt, "--workers-batch", "8", "--max-queue", "8", "--max-wait-ms", "1000", "--threads", "2") \
            as (url8, p8), serve(ckpt, "--workers-batch", "1", "--max-queue", "64", "--threads", "2") as (url1, p1):
        wait_healthy(url8, p8)
        wait_healthy(url1, p1)
        check(burst(url8, [next(files) for _ in range(CLIENTS)])[0], reference)  # a full batch: RSS then holds one
        check(burst(url1, [next(files)])[0], reference)
        rates = {1: [], 8: []}
        for _ in range(2):  # interleaved rounds: the machine is shared
            for b, url in ((1, url1), (8, url8)):
                responses, seconds = burst(url, [next(files) for _ in range(CLIENTS)])
                assert check(responses, reference) == CLIENTS
                rates[b].append(CLIENTS / seconds)
        n8, s8 = batch_sizes(url8)
        n1, s1 = batch_sizes(url1)
        assert s1 == n1 and s8 / n8 > 1  # batch 1 ran one image at a time; the other coalesced
        ratio = max(rates[8]) / max(rates[1])
        print(f"\n{CLIENTS} concurrent clients: {max(rates[8]):.2f} embeddings/s with --workers-batch 8 (mean batch "
              f"{s8 / n8:.1f}), {max(rates[1]):.2f} with --workers-batch 1: ratio {ratio:.2f}")
        assert ratio > 0.5  # not a speed claim (CPU, shared machine): batching must not serialise badly

        # a flood: 4x the queue limit at once
        before = rss_mb(p8.pid)
        responses, seconds = burst(url8, [next(files) for _ in range(32)])
        after = rss_mb(p8.pid)
        codes = [r.status_code for r in responses]
        rejected = [r for r in responses if r.status_code == 429]
        assert set(codes) <= {200, 429} and rejected and codes.count(200) >= 8
        assert all(int(r.headers["retry-after"]) >= 1 and "retry later" in r.json()["detail"] for r in rejected)
        assert check(responses, reference) == codes.count(200)
        print(f"flood of 32 at a queue limit of 8: {codes.count(200)} answered, {len(rejected)} got 429, "
              f"{seconds:.1f} s; server RSS {before:.0f} MB before, {after:.0f} MB after")
        assert after - before < 256
        assert httpx.get(url8 + "/healthz").status_code == 200
