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

This module is the object-storage side (Bucket: where things are, segments, conditional creates); the store
classes on top of it (ObjectEmbeddingStore, ObjectStoreWriter) are in embeddings.store, beside the POSIX ones.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple, Union

from ..data.remote import create_object, filesystem, join, storage_options

SEGMENT = re.compile(r"^(\d{10})\.jsonl$")


class Bucket:
    """The objects of one store at an object-storage URL, named relative to it ('index/w/0000000000.jsonl')."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> Optional[bytes]:
        """An object's bytes, None when it does not exist."""
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.key(rel) if rel else self.root)

    def find(self, sub: str = "") -> List[str]:
        """Object names under sub/ (all: ''), relative to the store, fresh from the server."""
        base = self.key(sub) if sub else self.root
        self.fs.invalidate_cache()  # all of it: s3fs keeps the listings of sub-prefixes too
        try:
            return sorted(p[len(self.root) + 1:] for p in self.fs.find(base))
        except FileNotFoundError:
            return []

    def zarr_store(self, rel: str, read_only: bool) -> Any:
        """A zarr store (zarr.storage.FsspecStore) for the array or group at rel."""
        from zarr.storage import FsspecStore

        url = join(self.url, rel)
        return FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)

    def create(self, rel: str, data: bytes) -> None:
        """A new object, never an overwrite (FileExistsError when it exists; see data.remote.create_object)."""
        create_object(self.fs, self.key(rel), data)

    def put(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(rel), data)

    def logs(self) -> List[Tuple[str, Union[bytes, str, Exception]]]:
        """(label, the concatenated segments of one writer's log | why a stray object is ignored | the error that
        makes a log unreadable), sorted by label. Segments must run 0, 1, 2... without a gap."""
        segments: Dict[str, List[Tuple[int, str]]] = {}
        out: List[Tuple[str, Union[bytes, str, Exception]]] = []
        for rel in self.find("index"):
            writer, _, seg = rel[len("index/"):].partition("/")
            m = SEGMENT.match(seg)
            if not m:
                out.append((rel, "not a commit-log segment (stray object; ignored)"))
                continue
            segments.setdefault(writer, []).append((int(m.group(1)), self.key(rel)))
        paths = [p for segs in segments.values() for _, p in segs]
        blobs = self.fs.cat(paths, on_error="return") if paths else {}
        for writer in sorted(segments):
            segs = sorted(segments[writer])
            label = f"index/{writer}/"
            failed = [p for _, p in segs if not isinstance(blobs.get(p), bytes)]
            gaps = [i for i, (seq, _) in enumerate(segs) if seq != i]
            if failed:
                out.append((label, OSError(f"cannot read segment {failed[0]} ({blobs.get(failed[0])!r})")))
            elif gaps:
                out.append((label, OSError(f"segment {gaps[0]:010d}.jsonl is missing (segments are written in "
                                           "order and never deleted)")))
            else:
                out.append((label, b"".join(blobs[p] for _, p in segs)))
        return sorted(out, key=lambda t: t[0])

    def data_files(self) -> Dict[str, Optional[List[str]]]:
        """data/ entries: array name -> its object names, or None for an object directly in data/."""
        out: Dict[str, Optional[List[str]]] = {}
        for rel in self.find("data"):
            name, sep, rest = rel[len("data/"):].partition("/")
            if not sep:
                out.setdefault(name, None)
            else:
                files = out.get(name) or []
                files.append(rest)
                out[name] = files
        return out

    def nbytes(self) -> int:
        self.fs.invalidate_cache()
        return int(self.fs.du(self.root))
