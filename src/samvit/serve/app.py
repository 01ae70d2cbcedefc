"""The HTTP service: FastAPI routes over one ModelWorker and an EmbeddingCache, behind a guard (token, body size,
metrics). `create_app(predictor, ServeConfig(...))` gives the ASGI app; `samvit serve` runs it with uvicorn."""
from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hashlib
import hmac
import io
import json
import threading
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

import samvit

from ..errors import NonFiniteError
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
    timeout_s: float = 120.0  # per request, waiting for the model (504); also stops a running auto-mask job
    header_timeout_s: float = 10.0  # a request line and headers must arrive within it (408, connection closed)
    body_timeout_s: float = 60.0  # a whole request body must arrive within it (408)
    max_requests: int = 128  # requests handled at once (their body read), beyond which 503; /healthz is exempt
    max_connections: int = 512  # open connections (idle, slow or busy); a new one beyond it gets 503 and is closed
    auto_batch_bytes: int = 2**30  # memory for one /v1/segment/auto decoder pass's full-size masks
    cache_bytes: int = 2**30  # embeddings kept in memory (LRU)
    token: Optional[str] = None  # bearer token required on every route but /healthz and the page
    cors_origins: Tuple[str, ...] = ()
    decode_threads: int = 2
    model_name: str = "custom"


class PixelLimitError(samvit.ImageError):
    """A decodable image with more pixels than the service accepts."""


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class SlowReader(Exception):
    """The client did not take its answer within the body timeout (its connection is dropped)."""


class GaveUp(Exception):
    """Raised inside a running model job whose request is no longer waiting (timeout or disconnect)."""


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
    except Image.DecompressionBombError as e:  # Pillow's own check, in Image.open, for far larger headers
        raise PixelLimitError(f"image header declares more pixels than Pillow opens ({e}), over this server's "
                              f"limit of {max_pixels} pixels") from None
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
        if store is not None or store_writer is not None:
            from .cache import check_store_fits

            check_store_fits(predictor, store if store is not None else store_writer.store)
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

    async def wait(self, request: Request, fut: Future, stop: Optional[threading.Event] = None) -> Any:
        """The worker's answer; 504 past the timeout; a client that leaves cancels its work if not yet started
        (and sets `stop`, which a running job polls)."""
        loop = asyncio.get_running_loop()
        afut = asyncio.wrap_future(fut)
        deadline = loop.time() + self.config.timeout_s
        while True:
            done, _ = await asyncio.wait({afut}, timeout=max(0.0, min(0.2, deadline - loop.time())))
            if done:
                return afut.result()
            if await request.is_disconnected():
                fut.cancel()
                if stop is not None:
                    stop.set()
                raise ClientGone()
            if loop.time() >= deadline:
                fut.cancel()
                if stop is not None:
                    stop.set()
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


DTYPE_HEADER = "X-Samvit-Dtype"  # on every answer that carries an embedding or masks: the encoder's compute dtype


def embedding_response(key: str, item: Embedded, fmt: str, dtype: str, cached: bool, model: str) -> Response:
    """JSON facts, or the embedding itself as .npy ((1,C,h,w), as SamPredictor.get_image_embedding) or .safetensors
    (the file `samvit embed` writes: (C,h,w) with original_size / input_size metadata)."""
    info = EmbeddingInfo(id=key, original_size=item.original_size, input_size=item.input_size,
                         shape=list(item.embedding.shape), model=model, cached=cached,
                         compute_dtype=item.compute_dtype)
    if fmt == "json":
        return JSONResponse(info.model_dump(), headers={DTYPE_HEADER: item.compute_dtype})
    emb = item.embedding.to(getattr(torch, dtype))
    if not torch.isfinite(emb).all():  # float16 overflows past 65504
        raise HTTPException(422, f"dtype={dtype}: this embedding has values beyond {dtype}'s range; ask for "
                            "dtype=float32")
    headers = {"X-Samvit-Embedding": json.dumps(info.model_dump(), separators=(",", ":")),
               DTYPE_HEADER: item.compute_dtype}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, emb[None].numpy())
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    from safetensors.torch import save

    meta = {"original_size": "%d,%d" % item.original_size, "input_size": "%d,%d" % item.input_size,
            "model": model, "source_sha256": key, "dtype": item.compute_dtype}
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
    """ASGI middleware: bearer token, request body limit (413) and time limit (408; the body is read here, bounded),
    requests handled at once (503), metrics by route."""

    def __init__(self, app, service: Service, routes: list) -> None:
        self.app, self.service, self.routes = app, service, routes
        self.token = service.config.token.encode() if service.config.token else None
        self.handling = 0  # requests past their body, not yet answered (one event loop: no lock needed)

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
        config = self.service.config
        public = path in PUBLIC_PATHS or path.startswith("/static/") or scope["method"] == "OPTIONS"
        if self.token is not None and not public:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.token):
                return await _send_json(send, 401, "missing or wrong bearer token: send the header "
                                        "'Authorization: Bearer <token>' (the token `samvit serve --token` was given)",
                                        {"www-authenticate": "Bearer"})
        limit = config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over this server's limit of "
                                    f"{limit} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout_s
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                self.service.metrics.slow_clients.labels("body").inc()
                return await _send_json(send, 408, f"the request body did not arrive within {config.body_timeout_s:g} "
                                        f"s (this server's body timeout; {total} bytes came)")
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
        del chunks

        async def receive_buffered():
            return replay.pop() if replay else await receive()

        async def send_bounded(message) -> None:  # a client that does not read its answer is dropped
            try:
                await asyncio.wait_for(send(message), config.body_timeout_s)
            except asyncio.TimeoutError:
                self.service.metrics.slow_clients.labels("response").inc()
                abort = scope.get("samvit.abort")  # set by samvit's protocol (server.py): drop the unsent bytes
                if abort is not None:
                    abort()
                raise SlowReader() from None

        if path == "/healthz":  # load balancers must see a live server as live, also when it is busy
            return await self.app(scope, receive_buffered, send_bounded)
        if self.handling >= config.max_requests:
            return await _send_json(send, 503, f"{self.handling} requests are being handled (this server's limit is "
                                    f"{config.max_requests}); retry later", {"retry-after": "1"})
        self.handling += 1
        try:
            await self.app(scope, receive_buffered, send_bounded)
        except SlowReader:
            pass
        finally:
            self.handling -= 1


async def _send_json(send, status: int, detail: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_detail(errors) -> list:
    """pydantic's errors as strict JSON: location, message and type; the offending input is not echoed (it may be a
    5,000-point list, or NaN, which JSON cannot hold)."""
    out = []
    for err in errors:
        loc = [x if isinstance(x, (str, int)) else str(x) for x in err.get("loc", ())]
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


def auto_batch(asked: int, original_size: Tuple[int, int], img_size: int, budget_bytes: int) -> int:
    """Prompts per decoder pass of an automatic-mask job: at most `asked`, fewer when the pass's float32 masks (3 per
    prompt, at the model's input size and at the image's) would exceed budget_bytes; at least 1. The records do not
    depend on it (the generator filters each pass alone and runs NMS after the last)."""
    h, w = original_size
    per_prompt = 3 * 4 * (img_size * img_size + h * w) + 3 * h * w  # logits at both sizes, then the boolean masks
    return max(1, min(asked, budget_bytes // per_prompt))


def create_app(predictor, config: ServeConfig = ServeConfig(), store=None, store_writer=None) -> FastAPI:
    """The FastAPI app around a samvit.Predictor that holds its encoder (the model worker starts with the app)."""
    service = Service(predictor, config, store, store_writer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        gc.collect()
        gc.freeze()  # the model and the imports live as long as the server: full collections (triggered by requests
        # that allocate many objects, e.g. a big JSON body) need not walk them; measured 600 ms -> 2 ms per collection
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return JSONResponse({"detail": _validation_detail(e.errors())}, status_code=422)

    @app.exception_handler(NonFiniteError)
    async def _non_finite(request, e):  # the model's output, not the client's input (prompts are checked before)
        return _error(500, f"{e}; nothing was cached, and no value of it is returned")

    @app.exception_handler(Exception)
    async def _bug(request, e):  # still logged with its traceback by the server
        return _error(500, f"internal error ({type(e).__name__}): a bug in samvit or a failure of the model; the "
                      "server log has the details")

    @app.exception_handler(QueueFull)
    async def _queue_full(request, e):
        return _error(429, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(ClientGone)
    async def _gone(request, e):
        return Response(status_code=499)  # nobody reads it; the status shows in the metrics (nginx's convention)

    @app.exception_handler(GaveUp)
    async def _gave_up(request, e):
        return _error(504, str(e))

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
            form = await request.form(max_files=1, max_fields=8)  # one image; a form of 10^5 parts is a 400
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
        body = SegmentResponse(id=key, original_size=item.original_size, masks=outs, best=int(np.argmax(scores)),
                               low_res_logits=Array.of(low) if req.return_low_res else None,
                               decoder_ms=seconds * 1000)
        return JSONResponse(body.model_dump(), headers={DTYPE_HEADER: item.compute_dtype})

    @app.post("/v1/segment/auto", response_model=AutoResponse, tags=["masks"])
    async def segment_auto(request: Request, req: AutoRequest):
        """Automatic masks for the whole image (a grid of point prompts, the official generator's filters), COCO
        RLE. Runs between encoder batches; a long one delays clicks that arrive meanwhile."""
        key, item = await service.image(request, req)
        batch = auto_batch(req.points_per_batch, item.original_size, service.img_size,
                           service.config.auto_batch_bytes)
        stop = threading.Event()

        def progress(done: int, total: int) -> None:  # called between decoder passes
            if stop.is_set():
                raise GaveUp(f"automatic masks stopped after {done} of {total} points: the request was given up "
                             f"(the timeout of {service.config.timeout_s:g} s, or the client left)")

        def run(predictor):
            predictor.set_embedding(item.embedding, item.original_size, item.input_size,
                                    early_features=item.early_features)
            gen = samvit.AutomaticMaskGenerator(
                predictor, points_per_side=req.points_per_side, points_per_batch=batch,
                pred_iou_thresh=req.pred_iou_thresh, stability_score_thresh=req.stability_score_thresh,
                box_nms_thresh=req.box_nms_thresh, min_mask_region_area=req.min_mask_region_area,
                output_mode="coco_rle", progress=progress)
            return gen.generate(None)

        records = await service.wait(request, service.worker.call(run, heavy=True), stop)
        body = AutoResponse(id=key, original_size=item.original_size, annotations=records)
        return JSONResponse(body.model_dump(), headers={DTYPE_HEADER: item.compute_dtype})

    @app.post("/v1/cvat/embedding", response_model=CvatResponse, tags=["cvat"])
    async def cvat(request: Request, req: CvatRequest):
        """CVAT's SAM interactor protocol: {"image": base64 file} -> {"blob": base64 of the float32 (1,256,64,64)
        embedding}; CVAT decodes it with np.frombuffer(..., np.float32).reshape(1, 256, 64, 64)."""
        _, item, _ = await service.embedding(request, b64decode(req.image, "image"))
        blob = np.ascontiguousarray(item.embedding[None].numpy(), dtype="<f4").tobytes()
        return JSONResponse(CvatResponse(blob=base64.b64encode(blob).decode()).model_dump(),
                            headers={DTYPE_HEADER: item.compute_dtype})

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
