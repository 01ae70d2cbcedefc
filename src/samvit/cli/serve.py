"""`samvit serve`: the HTTP service (embeddings, masks, a CVAT-compatible route, metrics) and the page at /."""
from __future__ import annotations

import argparse
import os

from .options import SAM_FILE, SAM_PRESETS, add_checkpoint, add_device, add_dtype, add_model

HELP = "serve embeddings and masks over HTTP (batching, cache, CVAT route) and a click-to-segment page"

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p, SAM_FILE)
    add_model(p, SAM_PRESETS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for every interface, with --token or behind a proxy)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=os.environ.get("SAMVIT_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on every route but /healthz and the page; default: "
                   "$SAMVIT_TOKEN (prefer the variable: a command line is visible to other users)")
    p.add_argument("--workers-batch", type=int, default=8, metavar="N",
                   help="most images per encoder batch (dynamic batching; default 8, 1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first image of a batch waits for more (default 10)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="images waiting for the encoder beyond which requests get 429 + Retry-After (default 32)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="per-request limit on waiting for the model, then 504 (default 120)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit, then 413 (default 32)")
    p.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="decoded image size limit in pixels, then 413 (default 50000000)")
    p.add_argument("--cache-mb", type=float, default=1024.0,
                   help="memory for cached embeddings (LRU by content hash; 4 MiB each; default 1024)")
    p.add_argument("--store", default=None, metavar="PATH",
                   help="back the cache with this embedding store (created if missing): a restart keeps the "
                   "embeddings; a store from `samvit embed --store` with the same checkpoint is used as it is")
    p.add_argument("--store-dtype", default=None, choices=["float32", "float16"],
                   help="dtype of a new --store (default float32: answers equal freshly computed ones)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://cvat.example.org) to call the API; "
                   "repeatable (default: CORS off)")
    p.add_argument("--max-requests", type=int, default=128, metavar="N",
                   help="requests handled at once (body received) beyond which 503 + Retry-After; /healthz is "
                   "exempt (default 128)")
    p.add_argument("--max-connections", type=int, default=512, metavar="N",
                   help="open connections (idle, slow or busy) beyond which a new one gets 503 and is closed "
                   "(default 512)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request line and its headers must arrive within it, then 408 and the connection is "
                   "closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a whole request body must arrive within it, then 408 (default 60)")
    add_device(p)
    add_dtype(p, auto=False, decoder=True)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import sys

    from . import UserError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"samvit serve needs the serve extra ({e}): pip install 'samvit[serve]'") from None
    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH (a full SAM checkpoint) or set SAMVIT_CHECKPOINT")
    for name in ("workers_batch", "max_queue", "max_pixels", "max_connections", "max_requests"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("timeout", "max_body_mb", "cache_mb", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.max_wait_ms >= 0:
        raise UserError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    if args.store_dtype and not args.store:
        raise UserError("--store-dtype only applies with --store PATH")
    if args.token is not None and len(args.token) < 8:
        raise UserError("--token must be at least 8 characters")

    import torch

    from ..checkpoints.registry import checkpoint_sha256, resolve_checkpoint
    from ..masks.predictor import Predictor
    from ..runtime import resolve_device, resolve_dtype
    from ..serve import ServeConfig, create_app
    from ..serve.server import uvicorn_config

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(args.checkpoint)
    dtype = resolve_dtype(args.dtype)
    print(f"samvit serve: image encoder dtype {str(dtype).replace('torch.', '')} "
          f"({'asked for' if args.dtype else 'the default'}; the prompt decoder runs in float32)", file=sys.stderr)
    predictor = Predictor.from_checkpoint(checkpoint, args.model, device=resolve_device(args.device), dtype=dtype)
    cfg = predictor.encoder.config
    store = writer = None
    if args.store:
        from ..serve.cache import open_store, store_hq

        store, writer = open_store(args.store, cfg, checkpoint_sha256(checkpoint), str(dtype).replace("torch.", ""),
                                   args.store_dtype, hq=store_hq(predictor))
    config = ServeConfig(max_batch=args.workers_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                         timeout_s=args.timeout, cache_bytes=int(args.cache_mb * 2**20), token=args.token,
                         cors_origins=tuple(args.cors_origin), model_name=cfg.name,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         max_requests=args.max_requests, max_connections=args.max_connections)
    app = create_app(predictor, config, store, writer)
    if args.host not in LOOPBACK and not args.token:
        print(f"samvit serve: warning: listening on {args.host} without --token: anyone who reaches this port can "
              "use the model", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    return 0
