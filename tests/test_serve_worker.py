"""The model worker alone, with a stand-in encoder that logs its calls: batching, prompt calls between batches, one
encode per image, given-up requests skipped, the cache bound."""
from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("prometheus_client")

import samvit  # noqa: E402
from samvit.serve.cache import Embedded, EmbeddingCache  # noqa: E402
from samvit.serve.worker import ModelWorker, QueueFull  # noqa: E402


class LoggingEncoder(torch.nn.Module):
    """Returns image i's embedding filled with its first pixel; logs the batch sizes; takes `seconds` per batch."""

    dtype = torch.float32

    def __init__(self, log: list, seconds: float = 0.05, on_first=None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log, self.seconds, self.on_first = log, seconds, on_first

    def forward(self, x):
        self.log.append(("encode", x.shape[0]))
        if self.on_first is not None:
            self.on_first()
            self.on_first = None
        time.sleep(self.seconds)
        return x[:, :1, :1, :1].expand(-1, 4, 2, 2).clone()


class FakePredictor:
    def __init__(self, encoder):
        self.encoder = encoder


def image(value: float) -> samvit.PreparedImage:
    return samvit.PreparedImage(torch.full((3, 8, 8), value), (6, 8), (6, 8))


def worker(log, max_batch=8, max_wait_ms=10.0, max_queue=16, seconds=0.05, on_first=None, cache_bytes=2**20):
    w = ModelWorker(FakePredictor(LoggingEncoder(log, seconds, on_first)), EmbeddingCache(cache_bytes), max_batch,
                    max_wait_ms, max_queue)
    w.start()
    return w


def submit(w, key, value):
    t = w.admit(key)
    if t.owner:
        w.provide(t, image(value))
    return t.future


def test_batches_coalesce_and_share():
    log = []
    w = worker(log, max_batch=4, max_wait_ms=300)
    try:
        futs = [submit(w, f"k{i}", float(i)) for i in range(3)] + [submit(w, "k1", 1.0)]  # k1 twice: one encode
        got = [f.result(10) for f in futs]
        assert log == [("encode", 3)]  # three images within max wait: one batch
        assert [float(g.embedding[0, 0, 0]) for g in got] == [0.0, 1.0, 2.0, 1.0]
        assert got[1] is got[3] and got[0].original_size == (6, 8)
        assert w.admit("k2") is None  # cached now: no new ticket
        assert w.queued_images == 0 and w.batches == 1
    finally:
        w.stop()


def test_prompt_calls_go_between_batches():
    log = []
    holder = {}

    def during_first_batch():  # a click arrives while the first image is being encoded, four more images queued
        holder["call"] = w.call(lambda predictor: log.append("prompt") or "mask")

    w = worker(log, max_batch=1, max_wait_ms=0, on_first=during_first_batch)
    try:
        gate = threading.Event()
        w.call(lambda p: gate.wait(10))
        futs = [submit(w, f"k{i}", float(i)) for i in range(5)]
        gate.set()
        for f in futs:
            f.result(10)
        assert holder["call"].result(10) == "mask"
        assert log == [("encode", 1), "prompt"] + [("encode", 1)] * 4  # it waited for one batch, not five
    finally:
        w.stop()


def test_given_up_requests_cost_nothing_and_queue_limit():
    log = []
    w = worker(log, max_batch=8, max_queue=3)
    try:
        gate = threading.Event()
        w.call(lambda p: gate.wait(10))
        futs = [submit(w, f"k{i}", float(i)) for i in range(3)]
        with pytest.raises(QueueFull) as e:
            w.admit("k3")
        assert e.value.retry_after >= 1
        assert futs[1].cancel()  # its client went away before the encoder started
        gate.set()
        assert futs[0].result(10) is not None and futs[2].result(10) is not None
        assert log == [("encode", 2)]
        assert w.queued_images == 0
        assert submit(w, "k4", 4.0).result(10) is not None  # room again
    finally:
        w.stop()


def test_decode_failure_reaches_every_waiter():
    w = worker([])
    try:
        owner = w.admit("bad")
        joined = w.admit("bad")
        assert owner.owner and not joined.owner
        w.fail(owner, samvit.ImageError("not an image"))
        for t in (owner, joined):
            with pytest.raises(samvit.ImageError):
                t.future.result(5)
        assert w.queued_images == 0
    finally:
        w.stop()


def test_cache_is_bounded_in_bytes():
    item = Embedded(torch.zeros(4, 2, 2), (1, 1), (1, 1))  # 64 bytes
    hits = []
    cache = EmbeddingCache(3 * item.nbytes, on_hit=hits.append)
    for k in "abcd":
        cache.put(k, item)
        if k == "b":
            assert cache.get("a") is item  # a is now the most recently used
    assert len(cache) == 3 and cache.nbytes == 3 * item.nbytes
    assert cache.get("b") is None and cache.get("a") is item  # b was the least recently used
    assert hits == ["memory", "memory"]
    EmbeddingCache(item.nbytes - 1).put("x", item)  # larger than the whole cache: not kept, no error


def test_cache_reads_back_what_it_wrote_behind(tmp_path):
    """An embedding evicted from memory after the write behind is read from the store (its index refreshed)."""
    store = samvit.EmbeddingStore.create(tmp_path / "store", model="m", config={}, embedding_shape=(4, 2, 2),
                                         checkpoint_sha256="0" * 64, dtype="float32")
    writer = store.writer(model="m", checkpoint_sha256="0" * 64, samvit_version="test", compute_dtype="float32")
    hits = []
    cache = EmbeddingCache(64, store, writer, on_hit=hits.append)  # room for one
    a, b = (Embedded(torch.full((4, 2, 2), v), (3, 4), (768, 1024)) for v in (1.0, 2.0))
    cache.put("a", a)
    cache.put("b", b)  # evicts a from memory
    cache._behind.submit(lambda: None).result(10)  # the writes behind are done
    got = cache.get("a")
    assert torch.equal(got.embedding, a.embedding) and got.original_size == (3, 4) and hits == ["store"]
    cache.close()
    assert sorted(samvit.EmbeddingStore.open(tmp_path / "store").keys()) == ["a", "b"]


def test_unreadable_store_item_is_a_miss(tmp_path, monkeypatch):
    store = samvit.EmbeddingStore.create(tmp_path / "store", model="m", config={}, embedding_shape=(4, 2, 2),
                                         checkpoint_sha256="0" * 64, dtype="float32")
    with store.writer(model="m", checkpoint_sha256="0" * 64, samvit_version="test", compute_dtype="float32") as w:
        w.put("k.png", torch.ones(4, 2, 2), sha256="ab" * 32, original_size=(3, 4), input_size=(768, 1024))
    store.refresh()
    cache = EmbeddingCache(2**20, store)
    assert cache.has("ab" * 32)
    monkeypatch.setattr(type(store), "__getitem__", lambda self, key: (_ for _ in ()).throw(OSError("bad chunk")))
    assert cache.get("ab" * 32) is None and not cache.has("ab" * 32)  # the worker will admit it for encoding
