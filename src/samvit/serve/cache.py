"""Embeddings by content hash: an LRU in memory bounded in bytes, optionally backed by an EmbeddingStore on disk."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger("samvit.serve")


@dataclass(frozen=True)
class Embedded:
    """One image's embedding (C,h,w) float32 on the CPU, with the sizes that map prompts and masks, and the dtype
    the encoder computed it in."""

    embedding: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    compute_dtype: str = "float32"
    early_features: Optional[torch.Tensor] = None  # HQ-SAM: the encoder's early features (C_vit,h,w)

    @property
    def nbytes(self) -> int:
        early = 0 if self.early_features is None else self.early_features.numel() * self.early_features.element_size()
        return self.embedding.numel() * self.embedding.element_size() + early


class EmbeddingCache:
    """get/put by id (sha256 of the image file). Memory first; a store (when given) is read on a miss and written
    behind every put by one background thread, so a restart keeps what was computed."""

    def __init__(self, max_bytes: int, store=None, store_writer=None,
                 on_hit: Optional[Callable[[str], None]] = None) -> None:
        self.max_bytes = max_bytes
        self._lru: "OrderedDict[str, Embedded]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.store, self._writer = store, store_writer
        self._on_hit = on_hit or (lambda tier: None)
        # A store written by `samvit embed --store` keys items by file path; its records carry the file's sha256.
        self._by_sha: Dict[str, str] = {}
        if store is not None:
            for key in store.keys():
                self._by_sha.setdefault(store.record(key)["sha256"], key)
        self._writing: set = set()
        self._behind = ThreadPoolExecutor(1, thread_name_prefix="samvit-store") if store_writer is not None else None

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: str) -> Optional[Embedded]:
        """The cached embedding, or None; a store hit is promoted into memory. Reads disk on a store hit."""
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
        if hit is not None:
            self._on_hit("memory")
            return hit
        store_key = self._by_sha.get(key)
        if store_key is None:
            return None
        try:
            try:
                emb, meta = self.store[store_key]
            except KeyError:  # committed by this server after the store's index was read
                self.store.refresh()
                emb, meta = self.store[store_key]
            early = None if self.store.early_shape is None else self.store.early_features(store_key).float()
        except Exception as e:  # an unreadable item is encoded again rather than failing the request
            log.error("reading embedding %s from the store failed: %s", key[:16], e)
            self._by_sha.pop(key, None)  # so has(key) is False and the image is admitted for encoding
            return None
        hit = Embedded(emb.float().contiguous(), tuple(meta["original_size"]), tuple(meta["input_size"]),
                       str(meta.get("compute_dtype") or "unknown"), early)
        # e.g. a float16 store that overflowed: encode again
        if not torch.isfinite(hit.embedding).all() or (early is not None and not torch.isfinite(early).all()):
            log.error("embedding %s in the store holds NaN or infinite values; encoding it again", key[:16])
            self._by_sha.pop(key, None)
            return None
        self._insert(key, hit)
        self._on_hit("store")
        return hit

    def has(self, key: str) -> bool:
        """Whether get(key) would return an embedding (without reading it)."""
        with self._lock:
            return key in self._lru or key in self._by_sha

    def put(self, key: str, item: Embedded) -> None:
        """Keep an embedding (evicting the least recently used beyond max_bytes) and write it behind to the store;
        NonFiniteError for one holding NaN or inf (never kept)."""
        if not torch.isfinite(item.embedding).all():
            from ..errors import NonFiniteError

            raise NonFiniteError(f"embedding {key[:16]}... holds NaN or infinite values")
        self._insert(key, item)
        with self._lock:
            if self._behind is None or key in self._by_sha or key in self._writing:
                return
            self._writing.add(key)
        self._behind.submit(self._write, key, item)

    def _insert(self, key: str, item: Embedded) -> None:
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if item.nbytes > self.max_bytes:
                return
            self._lru[key] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._lru.popitem(last=False)
                self._bytes -= evicted.nbytes

    def _write(self, key: str, item: Embedded) -> None:
        try:
            self._writer.put(key, item.embedding, sha256=key, original_size=item.original_size,
                             input_size=item.input_size, early_features=item.early_features)
            self._writer.commit()
            self._by_sha[key] = key  # readable from the store only once committed
        except Exception as e:  # a full disk must not stop the service: the memory cache still holds it
            log.error("writing embedding %s to the store failed: %s", key[:16], e)
        finally:
            with self._lock:
                self._writing.discard(key)

    def close(self) -> None:
        """Finish the writes behind and close the store writer."""
        if self._behind is not None:
            self._behind.shutdown(wait=True)
            self._writer.close()


def store_hq(predictor) -> Optional[dict]:
    """The store identity's `hq` field for a predictor: HQ-SAM's early block and early-feature shape, else None."""
    if not getattr(predictor, "is_hq", False):
        return None
    c = predictor.decoder.config
    return {"hq_early_block": int(predictor.early_block),
            "early_shape": [c.hq_vit_dim, c.image_embedding_size, c.image_embedding_size]}


def check_store_fits(predictor, store) -> None:
    """StoreMismatchError unless the store holds what the predictor's decoder takes: HQ-SAM's early features for
    an HQ-SAM predictor (the same block and shape), none for plain SAM."""
    from ..embeddings.store import StoreMismatchError, _hq_str

    want, have = store_hq(predictor), store.identity.get("hq")
    if want != have:
        kind = "HQ-SAM" if want is not None else "plain SAM"
        raise StoreMismatchError(f"store {store.path} holds {_hq_str(have)}, but this predictor is {kind} and takes "
                                 f"{_hq_str(want)}: use a store made with this checkpoint")


def open_store(path: str, encoder_config, checkpoint_sha256: str, compute_dtype: str,
               store_dtype: Optional[str] = None, hq: Optional[dict] = None):
    """The EmbeddingStore at path (created when missing, float32 unless store_dtype says float16) and a writer.

    An existing store must have been made with the same model and checkpoint (StoreMismatchError otherwise); a store
    filled by `samvit embed --store` works too: its images are found by the sha256 of their files.
    """
    import os

    import samvit

    cfg = encoder_config
    shape = (cfg.out_chans, cfg.grid_size, cfg.grid_size)
    dtype = store_dtype if os.path.exists(path) else (store_dtype or "float32")
    store = samvit.EmbeddingStore.create(path, model=cfg.name, config=cfg.to_dict(), embedding_shape=shape,
                                         checkpoint_sha256=checkpoint_sha256, dtype=dtype, tile=None, hq=hq)
    writer = store.writer(model=cfg.name, checkpoint_sha256=checkpoint_sha256, samvit_version=samvit.__version__,
                          compute_dtype=compute_dtype, name="serve")
    return store, writer
