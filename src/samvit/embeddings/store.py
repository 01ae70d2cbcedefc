"""EmbeddingStore: the SAM embeddings of a collection in one directory, crash-safe, shared by concurrent writers.

Layout (a zarr v3 hierarchy plus an append-only commit log):

    PATH/zarr.json               root group; attributes["samvit"] = the store's identity (model, config, checkpoint
                                 sha256, embedding shape and dtype, tile settings), written once at creation
    PATH/data/<writer>/          one zarr array per writer session, shape (2**32, *embedding shape), one
                                 uncompressed chunk per row (= one embedding, or one tile), chunk files c.<row>.0.0.0
    PATH/index/<writer>.jsonl    that session's commit log: a header line, then one line per committed item,
                                 each `<json>\\t<crc32 of the json, 8 hex>\\n`
    PATH/failures.jsonl          the last `samvit embed` run's failures (not part of the store proper)

Why zarr: one chunk (one file, one object on a bucket) per embedding, readable by any zarr client (micro-sam keeps
its embeddings in zarr too), and zarr's local store already writes every chunk file atomically (temp + rename).

Crash safety. A writer writes an item's rows, fsyncs their chunk files, and only then appends the item's index line
and fsyncs the log: an item is complete once its line is complete (newline, valid crc). Readers ignore everything
else, so a process killed at any moment leaves at most rows nobody refers to and one torn last line. Each writer
session has its own array and its own log file, created fresh and never reopened, so several processes (torchrun
ranks, or independent runs) write into one store without locks; the store itself is created in a temporary
directory and renamed into place, so concurrent creators agree on one identity. When a key is committed more than
once (its file changed), the latest commit wins.

On object storage (a URL such as s3://bucket/embeddings.zarr: ObjectEmbeddingStore, ObjectStoreWriter) there is
no fsync, rename or append: rows are objects, and each commit is a new immutable log segment created
conditionally; see embeddings.objstore for that layout and its crash-safety argument.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import NonFiniteError, SamvitError, open_regular

FORMAT = "samvit-embedding-store"
FORMAT_VERSION = 1
ROW_CAPACITY = 2**32  # rows per writer array; chunks that are never written take no space
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
MAX_ROWS_PER_ITEM = 1 << 20  # tiles of one item: a bound on what an index line may claim
MAX_ROW_ELEMENTS = 1 << 28  # values in one embedding (1 GiB in float32): a bound on the store's shape
MAX_SIDE = 1 << 20  # pixels a side in an index line's sizes
EARLY_SUFFIX = ".early"  # HQ-SAM: data/<writer>.early holds the early features of data/<writer>
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # writer and array names: never a path
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PathLike = Union[str, os.PathLike]


class StoreError(SamvitError, ValueError):
    """A path that is not a readable embedding store, or a request that does not fit the store."""


class StoreMismatchError(StoreError):
    """A write into a store made with another model, checkpoint, dtype or tiling."""


class StoreCorruptError(StoreError):
    """An item whose data is missing or does not match the checksum its index line records."""


def utc_now() -> str:
    """The time as ISO-8601 UTC with microseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync(path: PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_line(record: Dict[str, Any]) -> bytes:
    """One commit-log line: compact JSON, a tab, the crc32 of the JSON bytes (8 hex digits), a newline."""
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return body + b"\t%08x\n" % zlib.crc32(body)


def decode_line(line: bytes) -> Optional[Dict[str, Any]]:
    """The record of a complete, intact log line, else None."""
    if not line.endswith(b"\n"):
        return None
    body, sep, crc = line[:-1].rpartition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def data_sha256(rows: np.ndarray) -> str:
    """sha256 of the rows' bytes as stored (C order, little endian)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).data).hexdigest()


def embedding_shape(config) -> Tuple[int, ...]:
    """Shape of one embedding from an EncoderConfig: (out_chans, grid, grid), or (grid, grid, width) without neck."""
    g = config.grid_size
    return (config.out_chans, g, g) if config.out_chans else (g, g, config.embed_dim)


@dataclass
class VerifyReport:
    """What `EmbeddingStore.verify` found: errors (corruption), notes (harmless leftovers of killed runs)."""

    checked: int = 0
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class EmbeddingStore:
    """Read access to an embedding store; `writer()` opens a session that adds items. See the module docstring."""

    def __init__(self, path: PathLike, verify: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.verify_reads = verify
        self._start(_read_identity(self.path))

    def _start(self, identity: Dict[str, Any]) -> None:
        """Take the store's identity (dtype, shapes) and read its index."""
        self.identity = identity
        self.dtype = np.dtype(STORE_DTYPES[identity["dtype"]])
        self.shape = tuple(identity["embedding_shape"])
        hq = identity.get("hq")
        # HQ-SAM: the shape of the early encoder features kept beside each embedding; None for plain SAM
        self.early_shape: Optional[Tuple[int, ...]] = None if hq is None else tuple(hq["early_shape"])
        self._arrays: Dict[str, Any] = {}
        self.refresh()

    # ---- opening and creating -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: PathLike, verify: bool = True) -> "EmbeddingStore":
        """Open an existing store for reading (and for `writer()`). Every read checks the item's data against the
        sha256 its index line records (StoreCorruptError naming the key otherwise); verify=False skips that.
        An object-storage URL (s3://bucket/embeddings.zarr) opens the store there (embeddings.objstore)."""
        if _is_url(path):
            return ObjectEmbeddingStore(os.fspath(path), verify=verify)
        return cls(path, verify=verify)

    @classmethod
    def create(cls, path: PathLike, *, model: str, config: Dict[str, Any], embedding_shape: Sequence[int],
               checkpoint_sha256: str, dtype: Optional[str] = None, tile: Optional[Dict[str, int]] = None,
               exist_ok: bool = True, hq: Optional[Dict[str, Any]] = None) -> "EmbeddingStore":
        """Create a store, or open the existing one after checking it was made with the same model and settings.

        dtype None means float16 for a new store and whatever an existing store holds. Raises StoreMismatchError
        when an existing store differs in model, config, checkpoint, dtype, tiling or HQ-SAM's early features. An
        object-storage URL creates the store there (embeddings.objstore: conditional writes instead of renames).
        hq: for HQ-SAM, {"hq_early_block": int, "early_shape": [C, h, w]}: each item also keeps those features.
        """
        if _is_url(path) and cls is EmbeddingStore:
            return ObjectEmbeddingStore.create(
                os.fspath(path), model=model, config=config, embedding_shape=embedding_shape,
                checkpoint_sha256=checkpoint_sha256, dtype=dtype, tile=tile, exist_ok=exist_ok, hq=hq)
        path = os.path.abspath(os.fspath(path))
        want = {"model": model, "config": config, "embedding_shape": [int(s) for s in embedding_shape],
                "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "tile": tile, "hq": _check_hq(hq, tile)}
        if dtype is not None and dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
        if not _is_store(path):
            _create_atomically(path, dict(want, dtype=dtype or "float16"))
        elif not exist_ok:
            raise StoreError(f"{path}: a store already exists here")
        store = cls(path)
        store.check_compatible(**want)
        return store

    def check_compatible(self, *, model: str, config: Dict[str, Any], embedding_shape: Sequence[int],
                         checkpoint_sha256: str, dtype: Optional[str], tile: Optional[Dict[str, int]],
                         hq: Optional[Dict[str, Any]] = None) -> None:
        """Raise StoreMismatchError unless new items made this way belong in this store."""
        have = self.identity
        diffs = []
        if have.get("hq") != hq:
            diffs.append(f"{_hq_str(have.get('hq'))} vs {_hq_str(hq)}")
        if have["checkpoint_sha256"] != checkpoint_sha256:
            diffs.append(f"checkpoint sha256 {have['checkpoint_sha256'][:16]}... vs {checkpoint_sha256[:16]}...")
        if have["config"] != config or have["model"] != model:
            diffs.append(f"model {have['model']!r} vs {model!r}" if have["model"] != model else
                         "model config differs")
        if dtype is not None and have["dtype"] != dtype:
            diffs.append(f"dtype {have['dtype']} vs {dtype}")
        if have.get("tile") != tile:
            diffs.append(f"tiling {_tile_str(have.get('tile'))} vs {_tile_str(tile)}")
        if list(have["embedding_shape"]) != list(embedding_shape):
            diffs.append(f"embedding shape {tuple(have['embedding_shape'])} vs {tuple(embedding_shape)}")
        if diffs:
            raise StoreMismatchError(
                f"store {self.path} was made with model {have['model']!r}, checkpoint sha256 "
                f"{have['checkpoint_sha256'][:16]}..., dtype {have['dtype']}, tiling {_tile_str(have.get('tile'))}; "
                f"this run differs ({'; '.join(diffs)}). Refusing to mix embeddings: use another store path.")

    # ---- the index --------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the commit logs (to see items committed by other writers since opening)."""
        records: Dict[str, Dict[str, Any]] = {}
        headers: Dict[str, Dict[str, Any]] = {}
        for _label, log in self._scan_logs():
            if not isinstance(log, tuple):  # not a log, or not readable: `verify` reports it
                continue
            header, recs, _bad = log
            if header is None:
                continue
            headers[header["writer"]] = header
            for rec in recs:
                old = records.get(rec["key"])
                if old is None or (rec["time"], rec["writer"]) >= (old["time"], old["writer"]):
                    records[rec["key"]] = rec
        self._records, self._headers = records, headers

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> List[str]:
        """The keys of all complete items, sorted."""
        return sorted(self._records)

    @property
    def tiled(self) -> bool:
        return self.identity.get("tile") is not None

    def record(self, key: str) -> Dict[str, Any]:
        """The raw committed index record of a key."""
        try:
            return self._records[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the store {self.path}") from None

    def metadata(self, key: str) -> Dict[str, Any]:
        """Per-item metadata: key, sha256 of the file, original/input size, tiles, model, checkpoint, version, time,
        and the model input side (img_size) from the store's config."""
        rec = self.record(key)
        head = self._headers[rec["writer"]]
        meta = {k: v for k, v in rec.items() if k not in ("writer", "array", "row", "rows", "data_sha256")}
        meta["original_size"] = tuple(rec["original_size"])
        if rec.get("input_size") is not None:
            meta["input_size"] = tuple(rec["input_size"])
        for k in ("model", "checkpoint_sha256", "samvit_version", "compute_dtype"):
            meta[k] = head.get(k)
        meta["dtype"] = self.identity["dtype"]
        if self.identity.get("hq") is not None:
            meta["hq_early_block"] = str(self.identity["hq"]["hq_early_block"])
        if self.identity["config"].get("img_size") is not None:
            meta["img_size"] = self.identity["config"]["img_size"]
        return meta

    # ---- reading ------------------------------------------------------------------------------------------------
    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            import zarr

            arr = self._arrays[name] = zarr.open_array(store=self._array_location(name), mode="r")
        return arr

    # ---- where things are: the POSIX layout (ObjectEmbeddingStore, below, overrides these for object storage) --
    def _array_location(self, name: str) -> Any:
        """What zarr opens for the data array of writer session `name`."""
        return os.path.join(self.path, "data", name)

    def _scan_logs(self) -> List[Tuple[str, Any]]:
        """(label, (header, records, bad lines) | a str: why it is ignored | a StoreError: why it cannot be read)
        of every entry of index/, sorted."""
        index_dir = os.path.join(self.path, "index")
        out: List[Tuple[str, Any]] = []
        for name in sorted(os.listdir(index_dir)) if os.path.isdir(index_dir) else []:
            if not name.endswith(".jsonl"):
                out.append((f"index/{name}", "not a commit log (stray file; ignored)"))
                continue
            try:
                out.append((f"index/{name}", _read_log(os.path.join(index_dir, name))))
            except StoreError as e:
                out.append((f"index/{name}", e))
        return out

    def _row_exists(self, array: str, row: int) -> bool:
        return os.path.isfile(self._chunk_path(array, row))

    def _data_files(self) -> Dict[str, Optional[List[str]]]:
        """data/ entries: array name -> its file names, or None for a file directly in data/."""
        data_dir = os.path.join(self.path, "data")
        out: Dict[str, Optional[List[str]]] = {}
        for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
            sub = os.path.join(data_dir, name)
            out[name] = os.listdir(sub) if os.path.isdir(sub) else None
        return out

    def _bytes_on_disk(self) -> int:
        nbytes = 0
        for root, _dirs, files in os.walk(self.path):
            nbytes += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
        return nbytes

    def _rows(self, rec: Dict[str, Any]) -> np.ndarray:
        arr = self._array(rec["array"])
        want = (1,) + self.shape
        if tuple(arr.shape[1:]) != self.shape or arr.dtype != self.dtype or tuple(arr.chunks) != want:
            raise StoreError(f"data/{rec['array']}: array of shape {arr.shape}, chunks {arr.chunks}, {arr.dtype}; "
                             f"expected (N, *{self.shape}) in chunks {want} of {self.dtype}")
        return arr[rec["row"]:rec["row"] + rec["rows"]]

    def _early_rows(self, rec: Dict[str, Any]) -> np.ndarray:
        """HQ-SAM: the early features of an item (1,*early_shape), from data/<array>.early."""
        if self.early_shape is None:
            raise StoreError(f"store {self.path} holds plain SAM embeddings, no HQ-SAM early features")
        arr = self._array(rec["array"] + EARLY_SUFFIX)
        want = (1,) + self.early_shape
        if tuple(arr.shape[1:]) != self.early_shape or arr.dtype != self.dtype or tuple(arr.chunks) != want:
            raise StoreError(f"data/{rec['array']}{EARLY_SUFFIX}: array of shape {arr.shape}, chunks {arr.chunks}, "
                             f"{arr.dtype}; expected (N, *{self.early_shape}) in chunks {want} of {self.dtype}")
        return arr[rec["row"]:rec["row"] + rec["rows"]]

    def _check_early(self, rec: Dict[str, Any]) -> Tuple[Optional[np.ndarray], Optional[str]]:
        """(early rows, None) of an HQ item's intact early features, else (None, what is wrong with them)."""
        if not isinstance(rec.get("early_sha256"), str):
            return None, "no early features recorded (the store is HQ-SAM's)"
        try:
            rows = self._early_rows(rec)
        except Exception as e:
            return None, f"cannot read its early features ({type(e).__name__}: {e})"
        if data_sha256(rows) != rec["early_sha256"]:
            name = rec["array"] + EARLY_SUFFIX
            missing = [r for r in range(rec["row"], rec["row"] + rec["rows"]) if not self._row_exists(name, r)]
            if missing:
                return None, f"early-feature rows {missing[:8]} of data/{name} are missing"
            return None, f"early-feature checksum mismatch (corrupted data in data/{name})"
        return rows, None

    def early_features(self, key: str) -> torch.Tensor:
        """HQ-SAM: the early encoder features (C,h,w) kept beside a key's embedding, checked against their recorded
        sha256 (unless opened with verify=False); StoreError for a plain SAM store."""
        if self.early_shape is None:
            raise StoreError(f"store {self.path} holds plain SAM embeddings, no HQ-SAM early features")
        rec = self.record(key)
        if not self.verify_reads:
            try:
                return torch.from_numpy(self._early_rows(rec)[0])
            except StoreError:
                raise
            except Exception as e:
                raise StoreCorruptError(f"store {self.path}: item {key!r}: cannot read its early features "
                                        f"({type(e).__name__}: {e})") from None
        rows, problem = self._check_early(rec)
        if problem:
            raise StoreCorruptError(f"store {self.path}: item {key!r} is damaged: {problem}; run "
                                    f"`samvit store verify {self.path}`")
        return torch.from_numpy(rows[0])

    def _check_item(self, key: str, rec: Dict[str, Any]) -> Tuple[Optional[np.ndarray], Optional[str]]:
        """(rows, None) of an intact item, else (None, what is wrong with it)."""
        try:
            rows = self._rows(rec)
        except Exception as e:  # a missing, damaged or foreign array
            return None, f"cannot read its data ({type(e).__name__}: {e})"
        if rows.shape != (rec["rows"],) + self.shape:
            return None, f"data shape {rows.shape}, expected {(rec['rows'],) + self.shape}"
        if data_sha256(rows) != rec["data_sha256"]:
            missing = [r for r in range(rec["row"], rec["row"] + rec["rows"])  # zarr reads a missing chunk as zeros
                       if not self._row_exists(rec["array"], r)]
            if missing:
                return None, f"data rows {missing[:8]} of data/{rec['array']} are missing"
            return None, f"data checksum mismatch (corrupted data in data/{rec['array']})"
        return rows, None

    def _read(self, key: str) -> np.ndarray:
        """The rows of a key, checked against its recorded sha256 (unless opened with verify=False)."""
        rec = self.record(key)
        if not self.verify_reads:
            try:
                return self._rows(rec)
            except Exception as e:
                raise StoreCorruptError(f"store {self.path}: item {key!r}: cannot read its data "
                                        f"({type(e).__name__}: {e})") from None
        rows, problem = self._check_item(key, rec)
        if problem:
            raise StoreCorruptError(f"store {self.path}: item {key!r} is damaged: {problem}; run "
                                    f"`samvit store verify {self.path}`")
        return rows

    def __getitem__(self, item: Union[str, Tuple[str, int]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """store[key] -> (embedding, metadata); a tiled store gives (T,*shape) for a key and one tile for [key, i]."""
        if isinstance(item, tuple):
            key, index = item
            return self.tile(key, index)
        rows = self._read(item)
        emb = torch.from_numpy(rows) if self.tiled else torch.from_numpy(rows[0])
        return emb, self.metadata(item)

    def image_embedding(self, key: str) -> Tuple[torch.Tensor, Tuple[int, int], Optional[Tuple[int, int]]]:
        """(embedding, original_size, input_size) of a whole-image key, the arguments of Predictor.set_embedding."""
        if self.tiled:
            raise StoreError(f"store {self.path} holds tiled embeddings (large images); masks need whole-image "
                             "embeddings")
        if key not in self:
            raise StoreError(f"{key!r} is not in the store {self.path} (see `samvit store ls {self.path}`)")
        emb, meta = self[key]
        return emb, meta["original_size"], meta.get("input_size")

    def hq_image_embedding(self, key: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, Any]]:
        """(embedding, early features or None for a plain SAM store, metadata) of a whole-image key: what
        Predictor.set_embedding takes (embedding, metadata["original_size"], ..., early_features=...)."""
        emb, _orig, _inp = self.image_embedding(key)
        early = self.early_features(key) if self.early_shape is not None else None
        return emb, early, self.metadata(key)

    def get(self, key: str) -> torch.Tensor:
        """The embedding alone (the store's dtype; a tiled store gives all tiles, (T,*shape))."""
        return self[key][0]

    def tile(self, key: str, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """One tile of a tiled item: (embedding, metadata with this tile's box, core and input_size)."""
        rec = self.record(key)
        if not self.tiled:
            raise StoreError(f"store {self.path} is not tiled; use store[key]")
        if not 0 <= index < rec["rows"]:
            raise IndexError(f"{key!r} has {rec['rows']} tiles, no tile {index}")
        row = self._read(key)[index]  # the whole item is read: its checksum covers all its tiles
        meta = self.metadata(key)
        meta.update(tile_index=index, **{k: tuple(v) for k, v in rec["tiles"][index].items()})
        return torch.from_numpy(row), meta

    def tiles(self, key: str) -> List[Tuple[Tuple[int, int, int, int], torch.Tensor]]:
        """All tiles of an item as (box (x0, y0, x1, y1) with halo in original pixels, embedding), row-major."""
        emb, meta = self[key]
        if not self.tiled:
            raise StoreError(f"store {self.path} is not tiled; use store[key]")
        return [(tuple(t["box"]), emb[i]) for i, t in enumerate(meta["tiles"])]

    def batches(self, batch_size: int = 64, keys: Optional[Sequence[str]] = None
                ) -> Iterator[Tuple[List[str], Union[torch.Tensor, List[torch.Tensor]], List[Dict[str, Any]]]]:
        """Iterate (keys, embeddings, metadata) in batches; embeddings stacked (B,*shape), or a list when tiled."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        keys = self.keys() if keys is None else list(keys)
        for i in range(0, len(keys), batch_size):
            chunk = keys[i:i + batch_size]
            got = [self[k] for k in chunk]
            embs = [g[0] for g in got]
            yield chunk, (embs if self.tiled else torch.stack(embs)), [g[1] for g in got]

    # ---- writing ------------------------------------------------------------------------------------------------
    def writer(self, *, model: str, checkpoint_sha256: str, samvit_version: str, compute_dtype: str,
               name: Optional[str] = None, durable: bool = True, allow_mixed_dtypes: bool = False) -> "StoreWriter":
        """A new writer session (its own data array and commit log). Refused (StoreMismatchError) when the store
        holds items computed in another compute_dtype, unless allow_mixed_dtypes."""
        if not allow_mixed_dtypes:
            check_compute_dtype(self, compute_dtype)
        return self._writer_class(self, model=model, checkpoint_sha256=checkpoint_sha256,
                                  samvit_version=samvit_version, compute_dtype=compute_dtype, name=name,
                                  durable=durable)

    # ---- checking -----------------------------------------------------------------------------------------------
    def verify(self, check_data: bool = True) -> VerifyReport:
        """Check every committed item: its log line, its rows' shape and sha256; list leftovers of killed runs.
        Stray files (in index/ or data/) are noted and never stop the check of the rest."""
        rep = VerifyReport()
        referenced: Dict[str, set] = {}
        for name, log in self._scan_logs():
            if isinstance(log, str):
                rep.notes.append(f"{name}: {log}")
                continue
            if isinstance(log, StoreError):
                rep.errors.append(f"{name}: {log}")
                continue
            header, recs, bad = log
            if header is None:
                rep.notes.append(f"{name}: no complete header line (a session killed at its start); ignored")
                continue
            for lineno, torn, why in bad:
                if torn:
                    rep.notes.append(f"{name}: line {lineno} is incomplete (a killed write); ignored")
                else:
                    rep.errors.append(f"{name}: line {lineno} is corrupt ({why})")
            for rec in recs:
                referenced.setdefault(rec["array"], set()).update(range(rec["row"], rec["row"] + rec["rows"]))
                if "early_sha256" in rec:
                    referenced.setdefault(rec["array"] + EARLY_SUFFIX, set()).update(
                        range(rec["row"], rec["row"] + rec["rows"]))
        for key in self.keys():
            rec = self._records[key]
            rep.checked += 1
            if check_data:
                _rows, problem = self._check_item(key, rec)
                if problem is None:
                    problem = nonfinite_problem(_rows)
                if problem is None and self.early_shape is not None:
                    _early, problem = self._check_early(rec)
                    if problem is None:
                        problem = nonfinite_problem(_early)
                        problem = problem and f"early features: {problem}"
                if problem:
                    rep.errors.append(f"{key}: {problem}")
        chunk = re.compile(r"^c\.(\d+)(\.0)*$")
        for name, files in self._data_files().items():
            if files is None:
                if name != "zarr.json":
                    rep.notes.append(f"data/{name}: stray file (not written by samvit; ignored)")
                continue
            partial = sum(f.endswith(".partial") for f in files)
            rows = {int(m.group(1)) for m in map(chunk.match, files) if m}
            stray = [f for f in files if not chunk.match(f) and not f.endswith(".partial") and f != "zarr.json"]
            orphans = len(rows - referenced.get(name, set()))
            if orphans or partial:
                rep.notes.append(f"data/{name}: {orphans} rows not committed, {partial} partial files "
                                 "(left by a killed run; ignored)")
            if stray:
                rep.notes.append(f"data/{name}: {len(stray)} stray files ({', '.join(sorted(stray)[:3])}; ignored)")
        return rep

    def _chunk_path(self, array: str, row: int) -> str:
        return os.path.join(self.path, "data", array, "c." + ".".join(["%d" % row] + ["0"] * len(self.shape)))

    def info(self) -> Dict[str, Any]:
        """The store's identity plus counts and bytes on disk."""
        nbytes = self._bytes_on_disk()
        rows = sum(r["rows"] for r in self._records.values())
        return dict(self.identity, path=self.path, items=len(self), rows=rows, writers=len(self._headers),
                    bytes_on_disk=nbytes)


class StoreWriter:
    """One writer session: `put` rows (written and fsynced at once), `commit` makes them visible; thread-unsafe."""

    def __init__(self, store: EmbeddingStore, *, model: str, checkpoint_sha256: str, samvit_version: str,
                 compute_dtype: str, name: Optional[str] = None, durable: bool = True) -> None:
        self.store = store
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.name = f"{stamp}-{uuid.uuid4().hex[:12]}" + (f"-{name}" if name else "")
        self.header = {"writer": self.name, "model": model, "checkpoint_sha256": checkpoint_sha256,
                       "samvit_version": samvit_version, "compute_dtype": compute_dtype,
                       "host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}
        self.durable = durable
        self._array = None
        self._early = None  # HQ-SAM: the early features' array, beside the embeddings'
        self._log = None
        self._next_row = 0
        self._pending: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self.committed = 0

    def _open(self) -> None:
        import zarr

        st = self.store
        array_dir = os.path.join(st.path, "data", self.name)
        self._array = zarr.create_array(
            store=array_dir, shape=(ROW_CAPACITY,) + st.shape, chunks=(1,) + st.shape, dtype=st.dtype,
            compressors=None, fill_value=0, chunk_key_encoding={"name": "default", "separator": "."},
            config={"write_empty_chunks": True},  # every committed row has its file: a missing one is damage
            attributes={"samvit_writer": self.header})
        self._open_early(os.path.join(st.path, "data", self.name + EARLY_SUFFIX))
        log_path = os.path.join(st.path, "index", self.name + ".jsonl")
        self._log = open(log_path, "xb")
        self._log.write(encode_line({"header": self.header}))
        self._sync_log()
        if self.durable:
            _fsync(array_dir, directory=True)
            if self._early is not None:
                _fsync(array_dir + EARLY_SUFFIX, directory=True)
            _fsync(os.path.join(st.path, "data"), directory=True)
            _fsync(os.path.join(st.path, "index"), directory=True)

    def _open_early(self, location: Any) -> None:
        """HQ-SAM: create the early features' array (data/<writer>.early) at `location`, as the embeddings'."""
        st = self.store
        if st.early_shape is None:
            return
        import zarr

        self._early = zarr.create_array(
            store=location, shape=(ROW_CAPACITY,) + st.early_shape, chunks=(1,) + st.early_shape, dtype=st.dtype,
            compressors=None, fill_value=0, chunk_key_encoding={"name": "default", "separator": "."},
            config={"write_empty_chunks": True}, attributes={"samvit_writer": self.header})

    def _write_rows(self, row: int, rows: np.ndarray, early: bool = False) -> None:
        """Write rows from `row` on (early: to the early features' array), durably (fsynced) when the session is
        durable."""
        (self._early if early else self._array)[row:row + rows.shape[0]] = rows
        if self.durable:
            for r in range(row, row + rows.shape[0]):
                p = self.store._chunk_path(self.name + (EARLY_SUFFIX if early else ""), r)
                if os.path.exists(p):  # an all-zero row is not written (zarr's empty-chunk rule)
                    _fsync(p)

    def _append_log(self, lines: bytes) -> None:
        """Commit: the rows' folder is synced first, then the log lines are appended and synced."""
        if self.durable:
            _fsync(os.path.join(self.store.path, "data", self.name), directory=True)
            if self._early is not None:
                _fsync(os.path.join(self.store.path, "data", self.name + EARLY_SUFFIX), directory=True)
        self._log.write(lines)
        self._sync_log()

    def _sync_log(self) -> None:
        self._log.flush()
        if self.durable:
            os.fsync(self._log.fileno())

    def put(self, key: str, embedding: Union[torch.Tensor, np.ndarray], *, sha256: str,
            original_size: Sequence[int], input_size: Optional[Sequence[int]] = None,
            tiles: Optional[List[Dict[str, Sequence[int]]]] = None,
            early_features: Union[torch.Tensor, np.ndarray, None] = None) -> None:
        """Write an item's rows now (untiled: one embedding; tiled: (T,*shape) with T tile dicts); commit() later.
        An HQ-SAM store also takes the early encoder features (C,h,w) of its identity's early_shape."""
        st = self.store
        if not isinstance(embedding, torch.Tensor):
            embedding = torch.from_numpy(np.asarray(embedding))
        torch_dtype = torch.float16 if st.dtype == np.float16 else torch.float32
        rows = embedding.detach().to(device="cpu", dtype=torch_dtype).contiguous().numpy()  # torch casts faster
        if rows.shape == st.shape:
            rows = rows[None]
        if rows.shape[1:] != st.shape:
            raise StoreError(f"{key!r}: embedding of shape {rows.shape} does not fit the store's {st.shape}")
        if st.tiled != (tiles is not None) or (tiles is not None and len(tiles) != rows.shape[0]):
            raise StoreError(f"{key!r}: tiles given {tiles is not None} ({rows.shape[0]} rows) for a store "
                             f"that is {'tiled' if st.tiled else 'not tiled'}")
        if not st.tiled and rows.shape[0] != 1:
            raise StoreError(f"{key!r}: {rows.shape[0]} embeddings for one key in an untiled store")
        problem = nonfinite_problem(rows)
        if problem:
            raise NonFiniteError(f"{key!r}: {problem}; not written to the store {st.path}")
        early = None
        if (early_features is None) != (st.early_shape is None):
            raise StoreError(f"{key!r}: " + ("no early features given for an HQ-SAM store" if early_features is None
                                             else "early features given for a plain SAM store"))
        if early_features is not None:
            if not isinstance(early_features, torch.Tensor):
                early_features = torch.from_numpy(np.asarray(early_features))
            early = early_features.detach().to(device="cpu", dtype=torch_dtype).contiguous().numpy()
            if early.shape == st.early_shape:
                early = early[None]
            if early.shape != (1,) + st.early_shape:
                raise StoreError(f"{key!r}: early features of shape {early_features.shape} do not fit the store's "
                                 f"{st.early_shape}")
            problem = nonfinite_problem(early)
            if problem:
                raise NonFiniteError(f"{key!r}: early features: {problem}; not written to the store {st.path}")
        with self._lock:
            if self._array is None:
                self._open()
            row = self._next_row
            self._next_row += rows.shape[0]
            self._write_rows(row, rows)
            if early is not None:
                self._write_rows(row, early, early=True)
            self._pending.append({
                "key": key, "sha256": sha256, "original_size": [int(v) for v in original_size],
                "input_size": None if input_size is None else [int(v) for v in input_size],
                "tiles": None if tiles is None else [{k: [int(x) for x in v] for k, v in t.items()} for t in tiles],
                "writer": self.name, "array": self.name, "row": row, "rows": int(rows.shape[0]),
                "data_sha256": data_sha256(rows), "time": utc_now(),
                **({} if early is None else {"early_sha256": data_sha256(early)})})

    def put_alias(self, key: str, source_key: str) -> None:
        """Commit `key` as pointing at the rows of an already committed item with the same file content."""
        src = dict(self.store.record(source_key))
        with self._lock:
            if self._array is None:
                self._open()
            src.update(key=key, writer=self.name, time=utc_now())
            self._pending.append(src)

    def commit(self) -> int:
        """Make every item put so far visible (fsynced data first, then their log lines); returns how many."""
        with self._lock:
            if not self._pending:
                return 0
            self._append_log(b"".join(encode_line(r) for r in self._pending))
            n = len(self._pending)
            self.committed += n
            self._pending.clear()
            return n

    def close(self) -> None:
        """Commit what is pending and close the log."""
        self.commit()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def nonfinite_problem(rows: np.ndarray) -> Optional[str]:
    """None when every value is finite, else what is wrong ('holds N NaN or infinite values of M')."""
    bad = rows.size - int(np.count_nonzero(np.isfinite(rows)))
    return f"holds {bad} NaN or infinite values (of {rows.size})" if bad else None


def check_compute_dtype(store: "EmbeddingStore", compute_dtype: str) -> None:
    """Refuse (StoreMismatchError) to add items computed in `compute_dtype` to a store that holds items computed in
    another one: embeddings of one store are comparable only when computed alike."""
    held = sorted({str(store._headers.get(r["writer"], {}).get("compute_dtype")) for r in store._records.values()}
                  - {compute_dtype, "None"})
    if held:
        raise StoreMismatchError(
            f"store {store.path} holds embeddings computed in {', '.join(held)}; this run computes {compute_dtype}: "
            f"give the same dtype (dtype={held[0]}), or allow_mixed_dtypes=True to add them anyway")


EmbeddingStore._writer_class = StoreWriter


class ObjectEmbeddingStore(EmbeddingStore):
    """An EmbeddingStore at an object-storage URL (s3://...; embeddings.objstore describes the layout and why it
    is crash-safe without rename): EmbeddingStore.open / create give one for a URL."""

    def __init__(self, url: str, verify: bool = True) -> None:
        from .objstore import Bucket

        self.bucket = Bucket(url)
        self.path = self.bucket.url
        self.verify_reads = verify
        data = self.bucket.read("zarr.json")
        if data is None and not self.bucket.find():
            raise FileNotFoundError(f"{self.path}: no such embedding store")
        self._start(_parse_identity(data or b"", self.path, self.path + "/zarr.json"))

    @classmethod
    def create(cls, path: PathLike, *, model: str, config: Dict[str, Any], embedding_shape: Sequence[int],
               checkpoint_sha256: str, dtype: Optional[str] = None, tile: Optional[Dict[str, int]] = None,
               exist_ok: bool = True, hq: Optional[Dict[str, Any]] = None) -> "ObjectEmbeddingStore":
        """EmbeddingStore.create at a URL: the group objects first, the identity last by a conditional create; a
        store another process created first is opened and checked like an existing one."""
        import tempfile

        import zarr

        from .._version import __version__
        from .objstore import Bucket

        bucket = Bucket(os.fspath(path))
        want = {"model": model, "config": config, "embedding_shape": [int(s) for s in embedding_shape],
                "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "tile": tile, "hq": _check_hq(hq, tile)}
        if dtype is not None and dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
        if bucket.exists("zarr.json"):
            if not exist_ok:
                raise StoreError(f"{bucket.url}: a store already exists here")
        else:
            if any(not rel.startswith("data/") for rel in bucket.find()):
                raise StoreError(f"{bucket.url}: holds objects and is not an embedding store (expected a new "
                                 "prefix or a store made by `samvit embed --store`)")
            ident = dict(want, dtype=dtype or "float16", format=FORMAT, version=FORMAT_VERSION, created=utc_now(),
                         samvit_version=__version__)
            docs = {}
            with tempfile.TemporaryDirectory() as tmp:  # zarr writes the group documents, uploaded as they are
                for name, attrs in (("root", {"samvit": ident}), ("data", {})):
                    zarr.create_group(store=os.path.join(tmp, name), zarr_format=3, attributes=attrs)
                    with open(os.path.join(tmp, name, "zarr.json"), "rb") as f:
                        docs[name] = f.read()
            bucket.put("data/zarr.json", docs["data"])  # the same bytes from every creator
            try:
                bucket.create("zarr.json", docs["root"])
            except FileExistsError:
                pass  # another process created the store first: opened and checked below
        store = cls(bucket.url)
        store.check_compatible(**want)
        return store

    def _array_location(self, name: str) -> Any:
        return self.bucket.zarr_store(f"data/{name}", read_only=True)

    def _chunk_key(self, array: str, row: int) -> str:
        return f"data/{array}/c." + ".".join(["%d" % row] + ["0"] * len(self.shape))

    def _row_exists(self, array: str, row: int) -> bool:
        return self.bucket.exists(self._chunk_key(array, row))

    def _scan_logs(self) -> List[Tuple[str, Any]]:
        return [(label, _parse_log(log) if isinstance(log, bytes) else
                 StoreError(str(log)) if isinstance(log, Exception) else log) for label, log in self.bucket.logs()]

    def _data_files(self) -> Dict[str, Optional[List[str]]]:
        return self.bucket.data_files()

    def _bytes_on_disk(self) -> int:
        return self.bucket.nbytes()


class ObjectStoreWriter(StoreWriter):
    """A writer session on object storage: rows as objects, commits as new immutable log segments (see
    embeddings.objstore). commit() writes a segment once commit_every items are pending or commit_seconds have
    passed (2 s, or SAMVIT_OBJSTORE_COMMIT_SECONDS; 0: every time, as on POSIX); close() always does."""

    commit_every = 32
    commit_seconds = float(os.environ.get("SAMVIT_OBJSTORE_COMMIT_SECONDS", "2.0"))
    _seq = 0
    _last_commit = 0.0

    def _open(self) -> None:
        import time

        import zarr

        st = self.store
        self._array = zarr.create_array(
            store=st.bucket.zarr_store(f"data/{self.name}", read_only=False), shape=(ROW_CAPACITY,) + st.shape,
            chunks=(1,) + st.shape, dtype=st.dtype, compressors=None, fill_value=0,
            chunk_key_encoding={"name": "default", "separator": "."}, config={"write_empty_chunks": True},
            attributes={"samvit_writer": self.header})
        self._open_early(st.bucket.zarr_store(f"data/{self.name}{EARLY_SUFFIX}", read_only=False))
        self._last_commit = time.monotonic()
        self._append_log(encode_line({"header": self.header}))

    def _write_rows(self, row: int, rows: np.ndarray, early: bool = False) -> None:
        (self._early if early else self._array)[row:row + rows.shape[0]] = rows  # one PUT per row, once stored

    def _append_log(self, lines: bytes) -> None:
        import time

        self.store.bucket.create(f"index/{self.name}/{self._seq:010d}.jsonl", lines)
        self._seq += 1
        self._last_commit = time.monotonic()

    def commit(self, force: bool = False) -> int:
        """Commit the pending items as one new segment (when enough are pending, enough time passed, or force)."""
        import time

        if not force and len(self._pending) < self.commit_every \
                and time.monotonic() - self._last_commit < self.commit_seconds:
            return 0
        return super().commit()

    def close(self) -> None:
        self.commit(force=True)


ObjectEmbeddingStore._writer_class = ObjectStoreWriter


def _is_url(path: object) -> bool:
    from ..data.remote import is_url

    return is_url(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else False


def _tile_str(tile: Optional[Dict[str, int]]) -> str:
    return "none" if not tile else f"tile {tile['size']} halo {tile['halo']}"


def _is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "zarr.json")) and os.path.isdir(os.path.join(path, "index"))


def _read_identity(path: str) -> Dict[str, Any]:
    meta_path = os.path.join(path, "zarr.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such embedding store")
    try:
        with open_regular(meta_path, "store metadata", StoreError) as f:
            data = f.read(1 << 24)
    except (OSError, ValueError):  # not a regular file: reported as not a store, below
        data = b""
    return _parse_identity(data, path, meta_path)


def _parse_identity(data: bytes, path: str, meta_path: str) -> Dict[str, Any]:
    """The store identity in the bytes of a root zarr.json; StoreError naming the path otherwise."""
    try:
        meta = json.loads(data)
        ident = meta["attributes"]["samvit"]
        if ident.get("format") != FORMAT:
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise StoreError(f"{path}: not a samvit embedding store (expected {meta_path} with a "
                         "'samvit' attribute, as written by `samvit embed --store`)") from None
    version = ident.get("version", 0)
    if type(version) is not int:
        raise StoreError(f"{meta_path}: store format version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {ident['version']} is newer than this samvit reads "
                         f"({FORMAT_VERSION}); upgrade samvit")
    problem = _identity_problem(ident)
    if problem:
        raise StoreError(f"{meta_path}: damaged store identity: {problem}")
    return ident


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _identity_problem(ident: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a store's identity (zarr.json attributes), or None."""
    for k in ("model", "checkpoint_sha256"):
        if not isinstance(ident.get(k), str):
            return f"field {k!r} missing or not text"
    if not isinstance(ident.get("dtype"), str) or ident["dtype"] not in STORE_DTYPES:
        return f"dtype {str(ident.get('dtype'))[:40]!r} is not one of {', '.join(STORE_DTYPES)}"
    shape = ident.get("embedding_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_is_int(s, 1, MAX_ROW_ELEMENTS) for s in shape)
            and int(np.prod(shape)) <= MAX_ROW_ELEMENTS):
        return f"embedding_shape {str(shape)[:60]} is not 1 to 4 positive sizes of at most {MAX_ROW_ELEMENTS} values"
    if not isinstance(ident.get("config"), dict):
        return "field 'config' missing or not an object"
    tile = ident.get("tile")
    if tile is not None and not (isinstance(tile, dict) and _is_int(tile.get("size"), 1, MAX_SIDE)
                                 and _is_int(tile.get("halo"), 0, MAX_SIDE)):
        return f"tile {str(tile)[:60]} is not {{'size': >= 1, 'halo': >= 0}}"
    hq = ident.get("hq")
    if hq is not None:
        shape = hq.get("early_shape") if isinstance(hq, dict) else None
        if not (isinstance(hq, dict) and _is_int(hq.get("hq_early_block"), 0, 65536) and isinstance(shape, list)
                and len(shape) == 3 and all(_is_int(v, 1, MAX_ROW_ELEMENTS) for v in shape)
                and int(np.prod(shape)) <= MAX_ROW_ELEMENTS):
            return f"hq {str(hq)[:60]} is not {{'hq_early_block': int, 'early_shape': [C, h, w]}}"
    return None


def _check_hq(hq: Optional[Dict[str, Any]], tile: Optional[Dict[str, int]]) -> Optional[Dict[str, Any]]:
    """The `hq` identity field in its canonical form (None for plain SAM); StoreError for a bad one."""
    if hq is None:
        return None
    try:
        out = {"hq_early_block": int(hq["hq_early_block"]), "early_shape": [int(v) for v in hq["early_shape"]]}
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"hq {str(hq)[:60]}: expected {{'hq_early_block': int, 'early_shape': [C, h, w]}}") from None
    if tile is not None:
        raise StoreError("HQ-SAM's early features are not kept for tiled embeddings (large images): embed whole "
                         "images for HQ-SAM")
    return out


def _hq_str(hq: Optional[Dict[str, Any]]) -> str:
    return "plain SAM embeddings" if hq is None else \
        f"HQ-SAM embeddings (early features of block {hq['hq_early_block']}, {tuple(hq['early_shape'])})"


def _pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, 1, MAX_SIDE) for x in v)


def _header_problem(h: Any) -> Optional[str]:
    if not isinstance(h, dict) or not isinstance(h.get("writer"), str) or not SAFE_NAME.match(h["writer"]):
        return "header without a valid writer name"
    if not all(isinstance(h.get(k), str) for k in ("model", "checkpoint_sha256")):
        return "header without model / checkpoint_sha256"
    return None


def _record_problem(rec: Dict[str, Any], writer: str) -> Optional[str]:
    """What is wrong with an index record (types, bounds, names), or None."""
    key = rec.get("key")
    if not isinstance(key, str) or not key or len(key) > 4096 or "\0" in key:
        return "key missing or not a text of 1 to 4096 characters"
    if rec.get("writer") != writer:
        return f"writer {str(rec.get('writer'))[:40]!r} is not this log's ({writer})"
    if not isinstance(rec.get("array"), str) or not SAFE_NAME.match(rec["array"]):
        return f"array name {str(rec.get('array'))[:40]!r} is not a writer name"
    if not _is_int(rec.get("row"), 0, ROW_CAPACITY - 1) or not _is_int(rec.get("rows"), 1, MAX_ROWS_PER_ITEM) \
            or rec["row"] + rec["rows"] > ROW_CAPACITY:
        return (f"rows {str(rec.get('row'))[:20]}+{str(rec.get('rows'))[:20]} out of bounds "
                f"(1 to {MAX_ROWS_PER_ITEM} rows below {ROW_CAPACITY})")
    if not isinstance(rec.get("data_sha256"), str) or not SHA256_HEX.match(rec["data_sha256"]):
        return "data_sha256 is not 64 hex digits"
    if "early_sha256" in rec and not (isinstance(rec["early_sha256"], str) and SHA256_HEX.match(rec["early_sha256"])):
        return "early_sha256 is not 64 hex digits"
    if not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("time"), str):
        return "sha256 or time missing"
    if not _pair(rec.get("original_size")) or not (rec.get("input_size") is None or _pair(rec["input_size"])):
        return f"original_size / input_size not two sizes of 1 to {MAX_SIDE} pixels"
    tiles = rec.get("tiles")
    if tiles is not None:
        if not isinstance(tiles, list) or len(tiles) != rec["rows"]:
            return "tiles is not a list of one entry per row"
        for t in tiles:
            if not (isinstance(t, dict) and all(isinstance(v, list) and all(_is_int(x, 0, MAX_SIDE) for x in v)
                                                for v in t.values())):
                return "a tile entry is not lists of pixel coordinates"
    return None


def _create_atomically(path: str, identity: Dict[str, Any]) -> None:
    """Build the store in a temporary sibling directory, then rename it into place (the loser of a race keeps
    the winner's store)."""
    import zarr

    from .._version import __version__

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if _is_store(path):
        return  # another process (a torchrun rank) created it since the caller looked
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise StoreError(f"{path}: exists and is not an embedding store (expected a new path, an empty "
                         "directory or a store made by `samvit embed --store`)")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        ident = dict(identity, format=FORMAT, version=FORMAT_VERSION, created=utc_now(), samvit_version=__version__)
        zarr.create_group(store=tmp, zarr_format=3, attributes={"samvit": ident})
        zarr.create_group(store=os.path.join(tmp, "data"), zarr_format=3)
        os.makedirs(os.path.join(tmp, "index"))
        for d in ("data", "index", ""):
            _fsync(os.path.join(tmp, d), directory=True)
        try:
            os.rename(tmp, path)  # replaces an empty directory; fails if another process got there first
        except OSError:
            if not _is_store(path):
                raise
        _fsync(parent, directory=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _read_log(path: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]], List[Tuple[int, bool, str]]]:
    """(header, valid complete records, [(line number, torn?, why)] of the lines that are not) of one commit log.
    Raises StoreError when the path is not a regular file."""
    with open_regular(path, "commit log", StoreError) as f:
        return _parse_log(f.read())


def _parse_log(data: bytes) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]], List[Tuple[int, bool, str]]]:
    """(header, valid complete records, [(line number, torn?, why)] of the lines that are not) of a log's bytes."""
    lines = data.splitlines(keepends=True)
    header, recs, bad = None, [], []
    for i, line in enumerate(lines):
        rec = decode_line(line)
        if rec is None:
            bad.append((i + 1, i == len(lines) - 1, "bad checksum or JSON"))  # only the last line can be torn
        elif i == 0 and "header" in rec:
            problem = _header_problem(rec["header"])
            if problem:
                bad.append((i + 1, False, problem))
            else:
                header = rec["header"]
        elif header is not None and "key" in rec:
            problem = _record_problem(rec, header["writer"])
            if problem:
                bad.append((i + 1, False, problem))
            else:
                recs.append(rec)
        else:
            bad.append((i + 1, False, "not a record of this log"))
    return header, recs, bad
