"""The one model worker: a thread that owns the model, coalesces embedding requests into encoder batches (max batch,
max wait) and answers prompt (decoder) calls between batches, ahead of any queued images."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

import torch

from ..errors import NonFiniteError
from .cache import Embedded, EmbeddingCache

log = logging.getLogger("samvit.serve")


class QueueFull(Exception):
    """The worker's queue is at its limit; retry_after is an estimate in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Ticket:
    """An admitted embedding request: `future` resolves to an Embedded; `owner` tickets must provide the image."""

    key: str
    future: Future
    owner: bool


@dataclass
class _EncodeJob:
    key: str
    waiters: List[Future] = field(default_factory=list)
    prepared: Any = None  # samvit PreparedImage once decoded
    ready_at: float = 0.0


class ModelWorker:
    """Runs every model call on one thread. Embedding requests for the same image share one encoder run."""

    def __init__(self, predictor, cache: EmbeddingCache, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 32, metrics=None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_ms at least 0")
        self.predictor, self.cache, self.metrics = predictor, cache, metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._cond = threading.Condition()
        self._jobs: Dict[str, _EncodeJob] = {}  # admitted, not finished: being decoded, queued or encoding
        self._ready: Deque[_EncodeJob] = deque()  # decoded, waiting for the encoder
        self._calls: Deque[tuple] = deque()  # (fn, future): prompt work, answered first
        self._heavy: Deque[tuple] = deque()  # (fn, future): long decoder work (automatic masks), one per turn
        self._stop = False
        self.seconds_per_image: Optional[float] = None  # moving average, for Retry-After and progress estimates
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="samvit-model", daemon=True)

    # ---- lifecycle ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def queued_images(self) -> int:
        return len(self._jobs)

    @property
    def queued_calls(self) -> int:
        return len(self._calls) + len(self._heavy)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained a batch's worth (at least 1)."""
        per_image = self.seconds_per_image or 1.0
        return max(1, min(600, math.ceil(per_image * max(len(self._jobs), 1))))

    # ---- embeddings ----

    def admit(self, key: str) -> Optional[Ticket]:
        """Join the running request for this image, or take a queue place for it (QueueFull at the limit); None
        when it has just been cached (look again)."""
        fut: Future = Future()
        with self._cond:
            job = self._jobs.get(key)
            if job is not None:
                job.waiters.append(fut)
                return Ticket(key, fut, owner=False)
            if self.cache.has(key):
                return None
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} images are waiting for the encoder (the limit is "
                                f"{self.max_queue}); retry later", self.retry_after())
            self._jobs[key] = _EncodeJob(key, [fut])
        return Ticket(key, fut, owner=True)

    def provide(self, ticket: Ticket, prepared) -> None:
        """Hand over the decoded image (samvit.PreparedImage) of an owner ticket: it joins the next batch."""
        with self._cond:
            job = self._jobs[ticket.key]
            job.prepared, job.ready_at = prepared, time.monotonic()
            self._ready.append(job)
            self._cond.notify_all()

    def fail(self, ticket: Ticket, error: BaseException) -> None:
        """The owner could not decode the image: every request waiting for it gets the error."""
        with self._cond:
            job = self._jobs.pop(ticket.key, None)
        if job is not None:
            _resolve(job.waiters, error=error)

    # ---- decoder calls ----

    def call(self, fn: Callable[[Any], Any], heavy: bool = False) -> Future:
        """Run fn(predictor) on the worker thread: before any queued encoder batch, or (heavy) one between batches."""
        fut: Future = Future()
        with self._cond:
            if len(self._calls) + len(self._heavy) >= self.max_queue:
                raise QueueFull(f"{len(self._calls) + len(self._heavy)} prompt requests are waiting (the limit is "
                                f"{self.max_queue}); retry later", 1)
            (self._heavy if heavy else self._calls).append((fn, fut))
            self._cond.notify_all()
        return fut

    # ---- the thread ----

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                batch = self._next_work()
                if batch is None:
                    return
            kind, work = batch
            if kind == "encode":
                self._encode(work)
            else:
                fn, fut = work
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.predictor))
                    except BaseException as e:  # noqa: BLE001 - handed to the request that asked
                        fut.set_exception(e)

    def _next_work(self):
        """Under the lock: the next thing to run (calls first, then a batch, then heavy work), or None to stop."""
        while True:
            if self._stop:
                return None
            if self._calls:
                return "call", self._calls.popleft()
            if self._ready:
                deadline = self._ready[0].ready_at + self.max_wait
                wait = deadline - time.monotonic()
                if len(self._ready) < self.max_batch and wait > 0:
                    self._cond.wait(wait)  # more images may join; a prompt call wakes us at once
                    continue
                batch = [self._ready.popleft() for _ in range(min(self.max_batch, len(self._ready)))]
                return "encode", batch
            if self._heavy:
                return "heavy", self._heavy.popleft()
            self._cond.wait()

    def _encode(self, jobs: List[_EncodeJob]) -> None:
        with self._cond:  # requests that all went away (disconnect, timeout) cost no encoder time
            live = [j for j in jobs if not all(w.cancelled() for w in j.waiters)]
            for j in jobs:
                if j not in live:
                    self._jobs.pop(j.key, None)
        if not live:
            return
        encoder = self.predictor.encoder
        t0 = time.perf_counter()
        try:
            p = next(encoder.parameters())
            x = torch.stack([j.prepared.tensor for j in live]).to(device=p.device, dtype=encoder.dtype)
            early = None
            with torch.inference_mode():
                if getattr(self.predictor, "is_hq", False):  # HQ-SAM: the decoder also takes an early block's output
                    from ..modeling.mask_decoder_hq import encode_hq

                    out, early = encode_hq(encoder, x, self.predictor.early_block)
                    early = early.float().cpu()
                out = out.float().cpu() if early is not None else encoder(x).float().cpu()
        except BaseException as e:  # noqa: BLE001 - e.g. out of memory: the requests get the error
            log.exception("encoder batch of %d failed", len(live))
            with self._cond:
                for j in live:
                    self._jobs.pop(j.key, None)
            for j in live:
                _resolve(j.waiters, error=e)
            return
        seconds = time.perf_counter() - t0
        per_image = seconds / len(live)
        self.seconds_per_image = per_image if self.seconds_per_image is None else \
            0.7 * self.seconds_per_image + 0.3 * per_image
        self.batches += 1
        if self.metrics is not None:
            self.metrics.encoder_batch(len(live), seconds)
        compute_dtype = str(encoder.dtype).replace("torch.", "")
        for i, (j, emb) in enumerate(zip(live, out)):
            item = Embedded(emb.clone(), tuple(j.prepared.original_size), tuple(j.prepared.input_size), compute_dtype,
                            None if early is None else early[i].clone())
            error = None
            if torch.isfinite(emb).all() and (early is None or torch.isfinite(early[i]).all()):
                self.cache.put(j.key, item)  # before the waiters wake: a request that follows finds it cached
            else:  # damaged weights, or overflow in a low-precision dtype: an error, never cached nor returned
                log.error("the encoder gave NaN or infinite values for image %s", j.key[:16])
                error = NonFiniteError(f"the image encoder gave NaN or infinite values for this image (compute dtype "
                                       f"{compute_dtype}; damaged weights, or an overflow)")
            with self._cond:
                self._jobs.pop(j.key, None)
                waiters = list(j.waiters)
            j.prepared = None
            _resolve(waiters, result=None if error else item, error=error)


def _resolve(waiters: List[Future], result: Any = None, error: Optional[BaseException] = None) -> None:
    for w in waiters:
        try:
            if error is not None:
                w.set_exception(error)
            else:
                w.set_result(result)
        except InvalidStateError:  # cancelled by its request meanwhile
            pass
