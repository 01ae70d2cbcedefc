"""`samvit serve` under load on loopback: embeddings/s and p50/p95 latency at several concurrencies, with and without
dynamic batching (servers interleaved level by level), and click-to-mask latency (HTTP, and optionally in Chromium).

    python benchmarks/bench_serve.py --model tiny --threads 2 --concurrency 1,4,16 --batches 1,8 --browser

Weights are random (speed does not depend on them). `tiny` is the test model (width 64, 2 blocks, 1024 input, 256
channels out: the real embedding and decoder sizes, a cheap encoder); `vit_b` is the released ViT-B architecture.
Both have the released prompt decoder architecture (256 wide, MLP 2048, 8 heads), so click-to-mask is the real cost.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image, PngImagePlugin


def build_checkpoint(model: str, path: str) -> str:
    """A full SAM checkpoint (official key names) with random weights; tiny carries its config in the metadata."""
    import torch
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    import samvit

    torch.manual_seed(0)
    if model == "vit_b":
        sam = sam_model_registry["vit_b"]()
        meta = {}
    else:
        from functools import partial

        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        cfg = samvit.EncoderConfig(img_size=1024, embed_dim=64, depth=2, num_heads=2, window_size=14,
                                   global_attn_indexes=(1,), out_chans=256, name="tiny1024")
        enc = ImageEncoderViT(img_size=1024, embed_dim=64, depth=2, num_heads=2, out_chans=256, qkv_bias=True,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
                              global_attn_indexes=(1,))
        sam = Sam(image_encoder=enc, prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                                                  input_image_size=(1024, 1024), mask_in_chans=16),
                  mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                      depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256))
        meta = {"samvit_config": cfg.to_json()}
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, path, metadata=meta)
    return path


def image_files(n: int, h: int = 480, w: int = 640):
    """n distinct PNG files (another content hash each: no cache hits) of one synthetic image with a disc."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(20, 60, size=(h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    rgb[(yy - h / 2) ** 2 + (xx - 0.6 * w) ** 2 <= (h / 4) ** 2] = (240, 150, 40)
    for i in range(n):
        info = PngImagePlugin.PngInfo()
        info.add_text("n", str(i))
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
        yield buf.getvalue()


def p95(values) -> float:
    """95th percentile, linear between the order statistics (the max for fewer than two values)."""
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else max(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(ckpt: str, batch: int, threads: int, max_wait_ms: float):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "samvit", "serve", "--checkpoint", ckpt, "--port", str(port),
                             "--workers-batch", str(batch), "--max-queue", "256", "--threads", str(threads),
                             "--max-wait-ms", str(max_wait_ms), "--timeout", "3600", "--log-level", "error"])
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError("samvit serve exited")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() - t0 > 300:
                raise RuntimeError("samvit serve did not start")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def level(url: str, clients: int, per_client: int, files) -> dict:
    """`clients` threads, each posting `per_client` distinct images one after another; throughput and latency."""
    import httpx

    bodies = [[next(files) for _ in range(per_client)] for _ in range(clients)]
    lat, errors = [], []
    start = threading.Barrier(clients + 1)

    def client(mine):
        with httpx.Client(base_url=url, timeout=3600) as c:
            start.wait()
            for body in mine:
                t0 = time.perf_counter()
                r = c.post("/v1/embeddings", content=body)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=client, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"non-200 answers: {errors}")
    return {"images": len(lat), "seconds": wall, "per_s": len(lat) / wall, "p50": statistics.median(lat),
            "p95": p95(lat)}


def clicks(url: str, n: int, files) -> dict:
    """One image embedded, then n single-point prompts in a row (as the page sends them): round trip and decoder."""
    import httpx

    rng = np.random.default_rng(1)
    with httpx.Client(base_url=url, timeout=600) as c:
        info = c.post("/v1/embeddings", content=next(files)).json()
        h, w = info["original_size"]
        rtt, dec = [], []
        for i in range(n + 2):
            pt = [float(rng.uniform(0, w)), float(rng.uniform(0, h))]
            t0 = time.perf_counter()
            r = c.post("/v1/segment", json={"image_id": info["id"], "points": [pt], "labels": [1], "multimask": True,
                                            "format": "png", "return_low_res": False})
            if i >= 2:  # two warm-up clicks
                rtt.append(time.perf_counter() - t0)
                dec.append(r.json()["decoder_ms"] / 1000)
    return {"clicks": n, "p50": statistics.median(rtt), "p95": p95(rtt), "decoder_p50": statistics.median(dec),
            "size": [h, w]}


def browser_clicks(url: str, n: int, png: bytes, chromium: str) -> dict:
    """The page in Chromium: open the image, then n clicks (each alone: Escape clears between them); the page's own
    click-to-mask time (mouse up to the mask drawn)."""
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with tempfile.TemporaryDirectory() as d, sync_playwright() as p:
        path = os.path.join(d, "image.png")
        open(path, "wb").write(png)
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(url + "/")
        page.set_input_files("#file", path)
        page.wait_for_function("document.body.dataset.state === 'ready'", timeout=600_000)
        box = page.locator("#view").bounding_box()
        rng = np.random.default_rng(2)
        out = []
        for i in range(n + 2):
            drawn = page.evaluate("window.samvit.masksDrawn")
            page.mouse.click(box["x"] + rng.uniform(5, box["width"] - 5), box["y"] + rng.uniform(5, box["height"] - 5))
            page.wait_for_function(f"window.samvit.masksDrawn > {drawn} && !window.samvit.busy", timeout=600_000)
            if i >= 2:
                out.append(page.evaluate("window.samvit.lastLatencyMs") / 1000)
            page.keyboard.press("Escape")
            page.wait_for_function("window.samvit.mask === null && !window.samvit.busy")
        browser.close()
    return {"clicks": n, "p50": statistics.median(out), "p95": p95(out)}


def machine() -> str:
    from samvit.bench.runner import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} CPUs, flags: {m['isa_flags']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "vit_b"], default="tiny")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--batches", default="1,8", help="--workers-batch values compared")
    ap.add_argument("--per-client", type=int, default=2, help="images each client posts in a row")
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--browser", action="store_true", help="also time clicks in Chromium (Playwright)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    files = image_files(100_000)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {"model": args.model, "threads": args.threads, "machine": machine(), "date": started.isoformat(),
              "levels": {}, "command": " ".join(sys.argv), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        ckpt = build_checkpoint(args.model, os.path.join(d, "sam.safetensors"))
        urls = {b: stack.enter_context(server(ckpt, b, args.threads, args.max_wait_ms)) for b in batches}
        for b, url in urls.items():  # warm-up: one image at the largest concurrency's batch
            level(url, min(max(levels), b), 1, files)
        for c in levels:  # servers interleaved at every level: the machine is shared
            for b, url in urls.items():
                r = level(url, c, args.per_client, files)
                result["levels"].setdefault(str(c), {})[str(b)] = r
                print(f"concurrency {c:2d}, batch {b}: {r['per_s']:.2f} embeddings/s, p50 {r['p50']:.2f} s, "
                      f"p95 {r['p95']:.2f} s ({r['images']} images in {r['seconds']:.1f} s)", flush=True)
        url = urls[max(batches)]
        result["clicks"] = clicks(url, args.clicks, files)
        print(f"click to mask over HTTP: p50 {1000 * result['clicks']['p50']:.0f} ms, p95 "
              f"{1000 * result['clicks']['p95']:.0f} ms (decoder {1000 * result['clicks']['decoder_p50']:.0f} ms)")
        if args.browser:
            result["browser"] = browser_clicks(url, args.clicks, next(files), args.chromium)
            print(f"click to mask in Chromium: p50 {1000 * result['browser']['p50']:.0f} ms, p95 "
                  f"{1000 * result['browser']['p95']:.0f} ms")
    result["loadavg_after"] = os.getloadavg()
    print()
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def report(r: dict) -> str:
    batches = list(next(iter(r["levels"].values())))
    head = "| clients | " + " | ".join(f"batch {b}: emb/s | p50 s | p95 s" for b in batches) + " | ratio |"
    lines = [head, "|" + "---|" * (1 + 3 * len(batches) + 1)]
    for c, by in r["levels"].items():
        cells = " | ".join(f"{by[b]['per_s']:.2f} | {by[b]['p50']:.2f} | {by[b]['p95']:.2f}" for b in batches)
        ratio = by[batches[-1]]["per_s"] / by[batches[0]]["per_s"]
        lines.append(f"| {c} | {cells} | {ratio:.2f} |")
    c = r["clicks"]
    lines.append(f"\nclick to mask (HTTP round trip, {c['clicks']} clicks, {c['size'][1]}x{c['size'][0]} image): p50 "
                 f"{1000 * c['p50']:.0f} ms, p95 {1000 * c['p95']:.0f} ms; decoder alone p50 "
                 f"{1000 * c['decoder_p50']:.0f} ms")
    lines.append(f"\n{r['machine']}; {r['date'][:16]} UTC; load average (1, 5, 15 min) before "
                 f"{', '.join(f'{x:.1f}' for x in r['loadavg_before'])}, after "
                 f"{', '.join(f'{x:.1f}' for x in r['loadavg_after'])}")
    if "browser" in r:
        b = r["browser"]
        lines.append(f"click to mask in Chromium (mouse up to mask drawn, {b['clicks']} clicks): p50 "
                     f"{1000 * b['p50']:.0f} ms, p95 {1000 * b['p95']:.0f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
