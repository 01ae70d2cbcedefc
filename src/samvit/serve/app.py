"""The HTTP service: FastAPI routes over one ModelWorker and an EmbeddingCache, behind a guard (token, body size,
metrics). `create_app(predictor, ServeConfig(...))` gives the ASGI app; `samvit serve` runs it with uvicorn."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Tuple

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Path as PathParam, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

import samvit

from .cache import Embedded, EmbeddingCache
from .metrics import Metrics
from .schemas import (ID_PATTERN, Array, AutoRequest, AutoResponse, CvatRequest, CvatResponse, EmbeddingInfo, Health,
                      MaskOut, SegmentRequest, SegmentResponse)
from .worker import ModelWorker, QueueFull

STATIC = Path(__file__).parent / "static"
Format = Literal["json", "npy", "safetensors"]
Dtype = Literal["float32", "float16"]
PUBLIC_PATHS = ("/healthz", "/")  # the page and its files hold no data; everything else needs the token


@dataclass(frozen=True)
class ServeConfig:
    """Limits and settings of one service instance."""

    max_batch: int = 8  # images per encoder batch
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 32  # images admitted (decoding or waiting) beyond which requests get 429
    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 50_000_000  # decoded image size limit (413)
    timeout_s: float = 120.0  # per request, waiting for the model (504)
    cache_bytes: int = 2**30  # embeddings kept in memory (LRU)
    token: Optional[str] = None  # bearer token required on every route but /healthz and the page
    cors_origins: Tuple[str, ...] = ()
    decode_threads: int = 2
    model_name: str = "custom"


class PixelLimitError(samvit.ImageError):
    """A decodable image with more pixels than the service accepts."""


class ClientGone(Exception):
    """The client disconnected while its request waited."""


def decode_image(data: bytes, img_size: int, max_pixels: int):
    """Image file bytes -> samvit.PreparedImage, decoded as `samvit embed` decodes a file (EXIF orientation too)."""
    if not data:
        raise samvit.ImageError("empty image: expected the bytes of an image file (PNG, JPEG, WebP, TIFF, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise PixelLimitError(f"image is {w}x{h} = {w * h} pixels, over this server's limit of "
                                          f"{max_pixels} pixels")
                img = ImageOps.exif_transpose(img)
                img.load()
    except samvit.ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise samvit.ImageError(f"cannot decode the image: {len(data)} bytes starting {data[:12]!r} are not an image "
                                "file Pillow reads (PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from None
    except Exception as e:  # Pillow raises many types for truncated or foreign data
        raise samvit.ImageError(f"cannot decode the image ({type(e).__name__}: {e}); expected an image file such "
                                "as PNG or JPEG") from None
    return samvit.preprocess(img, img_size)


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: not valid base64") from None


class Service:
    """What the routes share: the model worker, the cache, the decode threads, the metrics."""

    def __init__(self, predictor, config: ServeConfig, store=None, store_writer=None) -> None:
        if predictor.encoder is None:
            raise ValueError("the service needs a Predictor with its image encoder")
        if getattr(predictor, "is_hq", False) and (store is not None or store_writer is not None):
            raise ValueError("an embedding store does not keep HQ-SAM's early encoder features: serve an HQ-SAM "
                             "checkpoint without --store")
        self.config = config
        self.predictor = predictor
        self.img_size = predictor.encoder.config.img_size
        self.metrics = Metrics()
        self.cache = EmbeddingCache(config.cache_bytes, store, store_writer,
                                    on_hit=lambda tier: self.metrics.cache_hits.labels(tier).inc())
        self.worker = ModelWorker(predictor, self.cache, config.max_batch, config.max_wait_ms, config.max_queue,
                                  self.metrics)
        self.metrics.watch(lambda: self.worker.queued_images, lambda: self.worker.queued_calls,
                           lambda: self.cache.nbytes)
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="samvit-decode")

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.decode_pool.shutdown(wait=True)
        self.cache.close()

    async def wait(self, request: Request, fut: Future) -> Any:
        """The worker's answer; 504 past the timeout; a client that leaves cancels its work if not yet started."""
        loop = asyncio.get_running_loop()
        afut = asyncio.wrap_future(fut)
        deadline = loop.time() + self.config.timeout_s
        while True:
            done, _ = await asyncio.wait({afut}, timeout=max(0.0, min(0.2, deadline - loop.time())))
            if done:
                return afut.result()
            if await request.is_disconnected():
                fut.cancel()
                raise ClientGone()
            if loop.time() >= deadline:
                fut.cancel()
                raise HTTPException(504, f"not answered within {self.config.timeout_s:g} s (this server's "
                                    "per-request timeout); the server is busy, retry later")

    async def embedding(self, request: Request, data: bytes) -> Tuple[str, Embedded, bool]:
        """(id, embedding, cached) of an image file's bytes: from the cache, or through the encoder once."""
        key = hashlib.sha256(data).hexdigest()
        while True:
            hit = await run_in_threadpool(self.cache.get, key)
            if hit is not None:
                return key, hit, True
            ticket = self.worker.admit(key)  # QueueFull -> 429
            if ticket is not None:
                break
        if ticket.owner:
            self.metrics.cache_misses.inc()
            loop = asyncio.get_running_loop()
            try:
                prepared = await loop.run_in_executor(self.decode_pool, decode_image, data, self.img_size,
                                                      self.config.max_pixels)
            except BaseException as e:
                self.worker.fail(ticket, e)
                raise
            self.worker.provide(ticket, prepared)
        return key, await self.wait(request, ticket.future), False

    async def cached(self, image_id: str) -> Embedded:
        hit = await run_in_threadpool(self.cache.get, image_id)
        if hit is None:
            raise HTTPException(404, f"image_id {image_id}: no embedding with this id here (the cache may have "
                                "evicted it); POST the image to /v1/embeddings, or send it as `image`")
        return hit

    async def image(self, request: Request, ref) -> Tuple[str, Embedded]:
        """The embedding an ImageRef names: by image_id, or the base64 image (encoded when new)."""
        if ref.image_id is not None:
            return ref.image_id, await self.cached(ref.image_id)
        key, item, _ = await self.embedding(request, b64decode(ref.image, "image"))
        return key, item


def embedding_response(key: str, item: Embedded, fmt: str, dtype: str, cached: bool, model: str) -> Response:
    """JSON facts, or the embedding itself as .npy ((1,C,h,w), as SamPredictor.get_image_embedding) or .safetensors
    (the file `samvit embed` writes: (C,h,w) with original_size / input_size metadata)."""
    info = EmbeddingInfo(id=key, original_size=item.original_size, input_size=item.input_size,
                         shape=list(item.embedding.shape), model=model, cached=cached)
    if fmt == "json":
        return JSONResponse(info.model_dump())
    emb = item.embedding.to(getattr(torch, dtype))
    headers = {"X-Samvit-Embedding": json.dumps(info.model_dump(), separators=(",", ":"))}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, emb[None].numpy())
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    from safetensors.torch import save

    meta = {"original_size": "%d,%d" % item.original_size, "input_size": "%d,%d" % item.input_size,
            "model": model, "source_sha256": key}
    return Response(save({"embedding": emb.contiguous()}, metadata=meta), media_type="application/octet-stream",
                    headers=headers)


def _mask_out(mask: np.ndarray, score: float, fmt: str) -> MaskOut:
    from ..masks.automatic import mask_to_rle, masks_to_boxes, rle_to_coco_string

    t = torch.from_numpy(mask)[None]
    x0, y0, x1, y1 = masks_to_boxes(t)[0].tolist()
    out = MaskOut(score=float(score), area=int(mask.sum()), bbox=[x0, y0, x1 - x0, y1 - y0])
    if fmt == "rle":
        out.rle = rle_to_coco_string(mask_to_rle(t)[0])
    else:
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
        out.png = base64.b64encode(buf.getvalue()).decode()
    return out


class Guard:
    """ASGI middleware: bearer token, request body limit (413; the body is read here, bounded), metrics by route."""

    def __init__(self, app, service: Service, routes: list) -> None:
        self.app, self.service, self.routes = app, service, routes
        self.token = service.config.token.encode() if service.config.token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            self.service.metrics.request(self._route(scope), scope["method"], status["code"],
                                         time.perf_counter() - t0)

    def _route(self, scope) -> str:
        """The route's path template (a bounded set of metric labels), also for requests stopped here."""
        route = scope.get("route")
        if route is None:
            from starlette.routing import Match

            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "other"

    async def _guarded(self, scope, receive, send) -> None:
        path = scope["path"]
        headers = dict(scope["headers"])
        public = path in PUBLIC_PATHS or path.startswith("/static/") or scope["method"] == "OPTIONS"
        if self.token is not None and not public:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.token):
                return await _send_json(send, 401, "missing or wrong bearer token: send the header "
                                        "'Authorization: Bearer <token>' (the token `samvit serve --token` was given)",
                                        {"www-authenticate": "Bearer"})
        limit = self.service.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over this server's limit of "
                                    f"{limit} bytes")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                return await _send_json(send, 413, f"request body is over this server's limit of {limit} bytes")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_buffered():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_buffered, send)


async def _send_json(send, status: int, detail: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(predictor, config: ServeConfig = ServeConfig(), store=None, store_writer=None) -> FastAPI:
    """The FastAPI app around a samvit.Predictor that holds its encoder (the model worker starts with the app)."""
    service = Service(predictor, config, store, store_writer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="samvit", version=samvit.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="SAM image embeddings and masks over HTTP: dynamic batching, a content-hash cache, a "
                  "CVAT-compatible route and a click-to-segment page at /.")
    app.state.service = service
    app.add_middleware(Guard, service=service, routes=app.router.routes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(PixelLimitError)
    async def _too_many_pixels(request, e):
        return _error(413, str(e))

    @app.exception_handler(samvit.ImageError)
    async def _bad_image(request, e):
        return _error(422, f"image: {e}")

    @app.exception_handler(samvit.PromptError)
    async def _bad_prompt(request, e):
        return _error(422, f"prompt: {e}")

    @app.exception_handler(QueueFull)
    async def _queue_full(request, e):
        return _error(429, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(ClientGone)
    async def _gone(request, e):
        return Response(status_code=499)  # nobody reads it; the status shows in the metrics (nginx's convention)

    model = config.model_name

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz():
        """200 once the model is loaded and its worker runs (no token needed)."""
        w = service.worker
        health = Health(status="ok" if w.alive else "stopped", model=model, queued_images=w.queued_images,
                        encoder_seconds_per_image=w.seconds_per_image)
        return JSONResponse(health.model_dump(), status_code=200 if w.alive else 503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics():
        """Prometheus text: requests by route and status, latencies, encoder batch sizes, queue depth, cache hits."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings", tags=["embeddings"], response_model=EmbeddingInfo, openapi_extra={"requestBody": {
        "required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                               "properties": {"image": {"type": "string", "format": "binary"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def post_embedding(request: Request, format: Format = "json", dtype: Dtype = "float32"):
        """Embed an image file (multipart field `image`, or the raw file as the body). The id is the sha256 of the
        file's bytes; the same file again is answered from the cache. format=npy|safetensors returns the
        embedding itself (facts in the X-Samvit-Embedding header)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "multipart body without a file field named `image`")
            data = await upload.read()
        else:
            data = await request.body()
        key, item, cached = await service.embedding(request, data)
        return embedding_response(key, item, format, dtype, cached, model)

    @app.get("/v1/embeddings/{image_id}", tags=["embeddings"], response_model=EmbeddingInfo)
    async def get_embedding(image_id: str = PathParam(pattern=ID_PATTERN), format: Format = "json",
                            dtype: Dtype = "float32"):
        """An embedding computed before, by id (404 when it is not cached here)."""
        return embedding_response(image_id, await service.cached(image_id), format, dtype, True, model)

    @app.post("/v1/segment", response_model=SegmentResponse, tags=["masks"])
    async def segment(request: Request, req: SegmentRequest):
        """Masks from points (1 = foreground, 0 = background), a box and/or a previous mask's low-res logits, in
        image pixels. One decoder pass; answered ahead of queued encoder batches."""
        key, item = await service.image(request, req)
        mask_input = None
        if req.mask_input is not None:
            try:
                mask_input = req.mask_input.numpy("mask_input")
            except ValueError as e:
                raise samvit.PromptError(str(e)) from None

        def run(predictor):
            t0 = time.perf_counter()
            predictor.set_embedding(item.embedding, item.original_size, item.input_size,
                                    early_features=item.early_features)
            out = predictor.predict(None if req.points is None else np.asarray(req.points, np.float64),
                                    None if req.labels is None else np.asarray(req.labels),
                                    None if req.box is None else np.asarray(req.box, np.float64),
                                    mask_input, multimask_output=req.multimask, hq_token_only=req.hq_token_only)
            return out, time.perf_counter() - t0

        (masks, scores, low), seconds = await service.wait(request, service.worker.call(run))
        service.metrics.decoder_seconds.observe(seconds)
        outs = await run_in_threadpool(lambda: [_mask_out(m, s, req.format) for m, s in zip(masks, scores)])
        return SegmentResponse(id=key, original_size=item.original_size, masks=outs, best=int(np.argmax(scores)),
                               low_res_logits=Array.of(low) if req.return_low_res else None,
                               decoder_ms=seconds * 1000)

    @app.post("/v1/segment/auto", response_model=AutoResponse, tags=["masks"])
    async def segment_auto(request: Request, req: AutoRequest):
        """Automatic masks for the whole image (a grid of point prompts, the official generator's filters), COCO
        RLE. Runs between encoder batches; a long one delays clicks that arrive meanwhile."""
        key, item = await service.image(request, req)

        def run(predictor):
            predictor.set_embedding(item.embedding, item.original_size, item.input_size,
                                    early_features=item.early_features)
            gen = samvit.AutomaticMaskGenerator(
                predictor, points_per_side=req.points_per_side, points_per_batch=req.points_per_batch,
                pred_iou_thresh=req.pred_iou_thresh, stability_score_thresh=req.stability_score_thresh,
                box_nms_thresh=req.box_nms_thresh, min_mask_region_area=req.min_mask_region_area,
                output_mode="coco_rle", progress=False)
            return gen.generate(None)

        records = await service.wait(request, service.worker.call(run, heavy=True))
        return AutoResponse(id=key, original_size=item.original_size, annotations=records)

    @app.post("/v1/cvat/embedding", response_model=CvatResponse, tags=["cvat"])
    async def cvat(request: Request, req: CvatRequest):
        """CVAT's SAM interactor protocol: {"image": base64 file} -> {"blob": base64 of the float32 (1,256,64,64)
        embedding}; CVAT decodes it with np.frombuffer(..., np.float32).reshape(1, 256, 64, 64)."""
        _, item, _ = await service.embedding(request, b64decode(req.image, "image"))
        blob = np.ascontiguousarray(item.embedding[None].numpy(), dtype="<f4").tobytes()
        return CvatResponse(blob=base64.b64encode(blob).decode())

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
