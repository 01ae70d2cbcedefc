"""The embedding store on object storage (s3://, gs://, az://, ... through fsspec): same layout, same readers,
crash safety by immutable objects and conditional creates instead of fsync and rename.

    URL/zarr.json                          root group with the store identity; created last, by a conditional
                                           create (If-None-Match: *), so concurrent creators agree on one identity
    URL/data/zarr.json                     the data group
    URL/data/<writer>/                     one zarr array per writer session, one object per row (c.<row>.0.0.0)
    URL/index/<writer>/<seq:010d>.jsonl    that session's commit log, as immutable segments: segment 0 holds the
                                           header line, each later segment the lines of one commit

Object storage has no rename and no append, but a PUT is atomic (an object is whole or absent) and acknowledged
only once stored. A writer PUTs an item's row objects first and a commit segment naming them after, each segment
a new object created conditionally (never overwritten; a retried create that finds its own bytes counts as done).
Segments are numbered 0, 1, 2... by their one writer; readers concatenate them in order and parse them as one log,
so `refresh`, resume, `verify` and "the latest commit of a key wins" are the POSIX store's. A writer killed at any
moment leaves rows nobody refers to (noted by `verify`), never a partial segment. Writers share nothing but the
store identity: each session's names carry a random id, so two writers never touch each other's objects and never
lose each other's items. Commits are grouped (every `commit_every` items or `commit_seconds`) to keep the number
of segments, which a reader lists and fetches, small.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.remote import create_object, filesystem, join, storage_options
from .store import (FORMAT, FORMAT_VERSION, STORE_DTYPES, EmbeddingStore, StoreError, StoreWriter, encode_line,
                    _parse_identity, _parse_log, utc_now)

SEGMENT = re.compile(r"^(\d{10})\.jsonl$")


def _fsspec_store(url: str, read_only: bool) -> Any:
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)


class ObjectEmbeddingStore(EmbeddingStore):
    """An EmbeddingStore at an object-storage URL (see the module docstring); open it with EmbeddingStore.open."""

    def __init__(self, url: str, verify: bool = True) -> None:
        self.fs, self.root = filesystem(url)
        self.path = url.rstrip("/")
        self.verify_reads = verify
        meta_url = join(self.path, "zarr.json")
        try:
            data = self.fs.cat_file(self.root + "/zarr.json")
        except FileNotFoundError:
            if not self.fs.exists(self.root):
                raise FileNotFoundError(f"{self.path}: no such embedding store") from None
            data = b""
        self.identity = _parse_identity(data, self.path, meta_url)
        self.dtype = np.dtype(STORE_DTYPES[self.identity["dtype"]])
        self.shape = tuple(self.identity["embedding_shape"])
        self._arrays: Dict[str, Any] = {}
        self.refresh()

    @classmethod
    def create(cls, path: str, *, model: str, config: Dict[str, Any], embedding_shape: Sequence[int],
               checkpoint_sha256: str, dtype: Optional[str] = None, tile: Optional[Dict[str, int]] = None,
               exist_ok: bool = True) -> "ObjectEmbeddingStore":
        """EmbeddingStore.create at a URL: the identity object is created conditionally; a store another process
        created first is opened and checked like an existing one."""
        url = path.rstrip("/")
        want = {"model": model, "config": config, "embedding_shape": [int(s) for s in embedding_shape],
                "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "tile": tile}
        if dtype is not None and dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
        fs, root = filesystem(url)
        if not fs.exists(root + "/zarr.json"):
            _create(fs, root, url, dict(want, dtype=dtype or "float16"))
        elif not exist_ok:
            raise StoreError(f"{url}: a store already exists here")
        store = cls(url)
        store.check_compatible(**want)
        return store

    # ---- where things are ---------------------------------------------------------------------------------------
    def _array_location(self, name: str) -> Any:
        return _fsspec_store(join(self.path, "data", name), read_only=True)

    def _chunk_path(self, array: str, row: int) -> str:
        return f"{self.root}/data/{array}/c." + ".".join(["%d" % row] + ["0"] * len(self.shape))

    def _row_exists(self, array: str, row: int) -> bool:
        return self.fs.exists(self._chunk_path(array, row))

    def _find(self, sub: str) -> List[str]:
        """Object paths under root/sub, relative to it, fresh from the server (fsspec caches listings)."""
        base = f"{self.root}/{sub}"
        self.fs.invalidate_cache()  # all of it: s3fs keeps the listings of sub-prefixes too
        try:
            return sorted(p[len(base) + 1:] for p in self.fs.find(base))
        except FileNotFoundError:
            return []

    def _scan_logs(self) -> List[Tuple[str, Any]]:
        segments: Dict[str, List[Tuple[int, str]]] = {}
        out: List[Tuple[str, Any]] = []
        for rel in self._find("index"):
            writer, _, seg = rel.partition("/")
            m = SEGMENT.match(seg)
            if not m or "/" in seg:
                out.append((f"index/{rel}", "not a commit-log segment (stray object; ignored)"))
                continue
            segments.setdefault(writer, []).append((int(m.group(1)), f"{self.root}/index/{rel}"))
        paths = [p for segs in segments.values() for _, p in segs]
        try:
            blobs = self.fs.cat(paths, on_error="return") if paths else {}
        except FileNotFoundError:
            blobs = {}
        for writer in sorted(segments):
            segs = sorted(segments[writer])
            label = f"index/{writer}/"
            gaps = [i for i, (seq, _) in enumerate(segs) if seq != i]
            failed = [p for _, p in segs if not isinstance(blobs.get(p), bytes)]
            if failed:
                out.append((label, StoreError(f"cannot read segments {failed[:3]} "
                                              f"({type(blobs.get(failed[0])).__name__})")))
                continue
            if gaps:
                out.append((label, StoreError(f"segment {gaps[0]:010d}.jsonl is missing (segments are "
                                              "written in order and never deleted)")))
                continue
            out.append((label, _parse_log(b"".join(blobs[p] for _, p in segs))))
        return out

    def _data_files(self) -> Dict[str, Optional[List[str]]]:
        out: Dict[str, Optional[List[str]]] = {}
        for rel in self._find("data"):
            name, sep, rest = rel.partition("/")
            if not sep:
                out.setdefault(name, None)
            else:
                files = out.get(name) or []
                files.append(rest)
                out[name] = files
        return out

    def _bytes_on_disk(self) -> int:
        self.fs.invalidate_cache()
        return int(self.fs.du(self.root))


class ObjectStoreWriter(StoreWriter):
    """A writer session on object storage: rows as objects, commits as immutable log segments (module docstring).
    `commit()` writes a segment once commit_every items are pending or commit_seconds have passed (default 2 s,
    or SAMVIT_OBJSTORE_COMMIT_SECONDS; 0: at every commit, as on POSIX); close() always."""

    commit_every = 32
    commit_seconds = float(os.environ.get("SAMVIT_OBJSTORE_COMMIT_SECONDS", "2.0"))

    def _open(self) -> None:
        import zarr

        st = self.store
        self._array = zarr.create_array(
            store=_fsspec_store(join(st.path, "data", self.name), read_only=False),
            shape=(2**32,) + st.shape, chunks=(1,) + st.shape, dtype=st.dtype, compressors=None, fill_value=0,
            chunk_key_encoding={"name": "default", "separator": "."}, config={"write_empty_chunks": True},
            attributes={"samvit_writer": self.header})
        self._seq = 0
        self._last_commit = time.monotonic()
        self._append_log(encode_line({"header": self.header}))

    def _write_rows(self, row: int, rows: np.ndarray) -> None:
        self._array[row:row + rows.shape[0]] = rows  # each row one PUT, acknowledged once stored

    def _append_log(self, lines: bytes) -> None:
        create_object(self.store.fs, f"{self.store.root}/index/{self.name}/{self._seq:010d}.jsonl", lines)
        self._seq += 1
        self._last_commit = time.monotonic()

    def commit(self, force: bool = False) -> int:
        """Commit the pending items as one new segment (when enough are pending, enough time passed, or force)."""
        if not force and len(self._pending) < self.commit_every \
                and time.monotonic() - getattr(self, "_last_commit", 0.0) < self.commit_seconds:
            return 0
        return super().commit()

    def close(self) -> None:
        self.commit(force=True)


ObjectEmbeddingStore._writer_class = ObjectStoreWriter


def _create(fs: Any, root: str, url: str, identity: Dict[str, Any]) -> None:
    """Write a new store's group objects, the identity last and only if no one else has (conditional create)."""
    import zarr

    from .._version import __version__

    existing = [p for p in _list(fs, root) if not p.startswith(root + "/data/")]
    if existing:
        raise StoreError(f"{url}: holds objects and is not an embedding store (expected a new prefix or a store "
                         "made by `samvit embed --store`)")
    ident = dict(identity, format=FORMAT, version=FORMAT_VERSION, created=utc_now(), samvit_version=__version__)
    with tempfile.TemporaryDirectory() as tmp:  # zarr writes the group documents; they are uploaded as they are
        zarr.create_group(store=os.path.join(tmp, "root"), zarr_format=3, attributes={"samvit": ident})
        zarr.create_group(store=os.path.join(tmp, "data"), zarr_format=3)
        with open(os.path.join(tmp, "root", "zarr.json"), "rb") as f:
            root_doc = f.read()
        with open(os.path.join(tmp, "data", "zarr.json"), "rb") as f:
            data_doc = f.read()
    fs.pipe_file(root + "/data/zarr.json", data_doc)  # the same bytes from every creator
    try:
        create_object(fs, root + "/zarr.json", root_doc)
    except FileExistsError:
        pass  # another process created the store first: the caller opens it and checks it is compatible


def _list(fs: Any, root: str) -> List[str]:
    fs.invalidate_cache()
    try:
        return fs.find(root)
    except FileNotFoundError:
        return []
