"""The one embed loop: images -> embeddings into a sink (one file per image, or an EmbeddingStore).

Every rank (under torchrun) takes a disjoint shard of the inputs; its DataLoader workers hash each file (sha256 of
its bytes), skip what the sink already holds under the same key and content, decode and preprocess the rest (whole
images, or tiles: samvit.data.tiles); the main thread runs the encoder on batches while a writer thread hands the
finished items to the sink (which writes, fsyncs and commits), so decoding and writing hide behind compute.
Progress goes to a callback, so a CLI, a service or a notebook can drive it. Inputs and the store may be on
object storage (s3://...; data.remote, embeddings.store.ObjectEmbeddingStore); samvit.ray runs the same stages
(prepare_units, load_encoder, StoreSink) as a Ray Data job.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .._version import __version__
from ..checkpoints.files import atomic_write, sha256_file
from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.preprocess import PreparedImage, collate, prepare
from ..data.remote import filesystem, is_url, read_bytes
from ..data.tiles import tile_grid
from ..errors import OutputError, SamvitError
from ..modeling.encoder import ImageEncoder
from ..modeling.mask_decoder_hq import encode_hq
from ..runtime import ProgressArg, progress_callback
from .files import check_not_an_input, output_path, plan_outputs, save_embedding
from .store import EmbeddingStore, embedding_shape

Item = Tuple[str, str]  # (path, key)


class _Units(IterableDataset):
    """Yields, per input, either a status ('done', 'reuse', 'failed') or its prepared tensors, one per tile."""

    def __init__(self, items: Sequence[Tuple[str, str]], img_size: int, done: Dict[str, str],
                 by_sha: Dict[str, str], tile: Optional[int], halo: int, max_pixels: int) -> None:
        self.items, self.img_size, self.done, self.by_sha = list(items), img_size, done, by_sha
        self.tile, self.halo, self.max_pixels = tile, halo, max_pixels

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        items = self.items if info is None else self.items[info.id::info.num_workers]
        for path, key in items:
            yield from prepare_units(path, key, self.img_size, self.done, self.by_sha, self.tile, self.halo,
                                     self.max_pixels)


def _read_object(url: str) -> Tuple[str, bytes]:
    """(sha256, bytes) of an object-storage input."""
    data = read_bytes(url)
    return hashlib.sha256(data).hexdigest(), data


def _decode_object(url: str, data: bytes, max_pixels: int):
    from ..data.images import ImageError, _decode

    if not data:
        raise ImageError(f"{url}: empty object (0 bytes)")
    return _decode(io.BytesIO(data), url, max_pixels)


def prepare_units(path: str, key: str, img_size: int, done: Dict[str, str], by_sha: Dict[str, str],
                  tile: Optional[int], halo: int, max_pixels: int) -> Iterator[Dict[str, Any]]:
    """One input -> its status ('done', 'reuse', 'failed') or its prepared tensors, one unit per tile. A local
    path or an object-storage URL (read once: hashed and decoded from the same bytes). Shared by the DataLoader
    workers here and the Ray Data decode stage (samvit.ray)."""
    base = {"key": key, "path": path}
    data = None
    try:
        if is_url(path):
            sha, data = _read_object(path)
        else:
            sha = sha256_file(path)  # only a regular file is opened: a FIFO or a device is reported, never read
    except (OSError, SamvitError) as e:
        reason = str(e) if isinstance(e, SamvitError) else \
            f"{path}: cannot read file ({type(e).__name__}: {e.strerror or e})"
        yield dict(base, status="failed", reason=reason)
        return
    if done.get(key) == sha:
        yield dict(base, status="done")
        return
    if sha in by_sha:
        yield dict(base, status="reuse", source=by_sha[sha])
        return
    try:
        rgb = load_image(path, max_pixels=max_pixels) if data is None else \
            _decode_object(path, data, max_pixels)
        del data
        h, w = rgb.shape[:2]
        grid = [(None, None)] if tile is None else tile_grid(h, w, tile, halo)
        for i, (core, box) in enumerate(grid):  # one tile at a time: a huge image never sits in memory twice
            crop = rgb if box is None else rgb[box[1]:box[3], box[0]:box[2]]
            prepared = prepare(crop, img_size)
            x, input_size = prepared.tensor, list(prepared.input_size)
            meta = None if box is None else {"box": list(box), "core": list(core), "input_size": input_size}
            yield dict(base, status="ok", sha256=sha, original_size=[h, w], input_size=input_size, tile=meta,
                       tile_index=i, n_tiles=len(grid), tensor=x)
    except Exception as e:  # ImageError carries the reason; anything else is reported by type
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        reason = reason if path in reason else f"{path}: {reason}"
        yield dict(base, status="failed", reason=reason)  # after any tiles already sent: the item is dropped


@dataclass
class EmbedReport:
    """Counts of one run (all ranks together when distributed) and the failed inputs with their reasons."""

    total: int = 0
    embedded: int = 0
    skipped: int = 0  # already in the output with the same content
    reused: int = 0  # same content as another key already in the store: committed without encoding
    failed: List[Dict[str, str]] = field(default_factory=list)  # {"key", "path", "reason"}
    seconds: float = 0.0
    encoded_rows: int = 0  # forward-pass inputs (tiles count one each)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: "EmbedReport") -> None:
        for k in ("total", "embedded", "skipped", "reused", "encoded_rows"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.failed += other.failed
        self.seconds = max(self.seconds, other.seconds)


class FileSink:
    """Output: one .safetensors per input under out_dir, at the input key's relative path (embeddings.files).

    Resumes: an output this model and checkpoint wrote from the same file content is skipped; one from changed
    content is rewritten. Any other existing output (or one over an input, outside out_dir, or shared by two
    inputs) stops the run before any work unless force (see embeddings.files.plan_outputs). `protected`: real
    paths of other files the run reads (checkpoint, list files) that no output may replace."""

    def __init__(self, out_dir: str, checkpoint_sha256: str = "", metadata: Optional[Dict[str, str]] = None,
                 force: bool = False, protected: Sequence[str] = ()) -> None:
        self.out_dir, self.checkpoint_sha256, self.extra = out_dir, checkpoint_sha256, dict(metadata or {})
        self.force, self.protected = force, {os.path.realpath(p) for p in protected}
        self.out_dtype = torch.float32
        self.written: List[str] = []

    def open(self, encoder: ImageEncoder, tile: Optional[int], halo: int, rank: int, world: int,
             items: Sequence[Item] = ()) -> Dict[str, str]:
        """Plan the outputs of `items` (refusing clashes, writes over inputs, foreign existing files); returns
        what is already done (key -> content sha256)."""
        if tile is not None:
            raise ValueError("tiles need an embedding store: pass a StoreSink (samvit embed --store PATH)")
        self.metadata = {"model": encoder.config.name, "checkpoint_sha256": self.checkpoint_sha256,
                         "samvit_version": __version__, "dtype": str(encoder.dtype).replace("torch.", ""),
                         "img_size": str(encoder.config.img_size), **self.extra}
        return plan_outputs(self.out_dir, items, model=encoder.config.name, checkpoint_sha256=self.checkpoint_sha256,
                            img_size=encoder.config.img_size, protected=self.protected, force=self.force)

    def put(self, key: str, embedding: torch.Tensor, *, sha256: str, original_size, input_size, tiles=None,
            early_features: Optional[torch.Tensor] = None) -> None:
        dest = output_path(self.out_dir, key)
        save_embedding(dest, embedding, original_size, input_size, dict(self.metadata, source=key,
                                                                        source_sha256=sha256),
                       early_features=early_features)
        self.written.append(dest)

    def put_alias(self, key: str, source_key: str) -> None:
        raise AssertionError("a FileSink reports nothing done, so nothing is reused")

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self, report: "EmbedReport", rank: int) -> None:
        pass


class StoreSink:
    """Output: an EmbeddingStore at `path` (created if new; resumes: what it holds with the same content is
    skipped). Failed inputs are listed in report_path (default PATH/failures.jsonl, rewritten every run)."""

    def __init__(self, path: str, checkpoint_sha256: str, dtype: Optional[str] = None,
                 report_path: Optional[str] = None, durable: bool = True, protected: Sequence[str] = (),
                 allow_mixed_dtypes: bool = False, early_block: Optional[int] = None) -> None:
        self.path, self.checkpoint_sha256, self.dtype = path, checkpoint_sha256, dtype
        self.early_block = early_block  # HQ-SAM: the store keeps this block's output beside each embedding
        self.allow_mixed_dtypes = allow_mixed_dtypes  # add items computed in another dtype than the store holds
        self.report_path, self.durable = report_path, durable
        self.protected = {os.path.realpath(p) for p in protected}
        self.report_error: Optional[str] = None

    def open(self, encoder: ImageEncoder, tile: Optional[int], halo: int, rank: int, world: int,
             items: Sequence[Item] = ()) -> Dict[str, str]:
        """Create or open the store (refusing another model, checkpoint, dtype or tiling) and a writer session;
        returns what it holds (key -> content sha256). Refuses, before any work, two items with one key and a
        store or report path that is one of the inputs."""
        protected = self.protected | {p if is_url(p) else os.path.realpath(p) for p, _ in items}
        keys: Dict[str, List[str]] = {}
        for p, k in items:
            keys.setdefault(k, []).append(p)
        clashes = {k: ps for k, ps in keys.items() if len(ps) > 1}
        if clashes:
            from ..data.sources import key_clash_message

            raise OutputError(key_clash_message(clashes, "store key", "give each input a distinct key"))
        report_path = self.report_path or _join(self.path, "failures.jsonl")
        if is_url(report_path):
            if report_path in protected:
                raise OutputError(f"{report_path}: failure report would replace one of this run's inputs")
        else:
            check_not_an_input(report_path, protected, "failure report")
        if (self.path.rstrip("/") if is_url(self.path) else os.path.realpath(self.path)) in protected \
                or (is_url(self.path) and any(p.startswith(self.path.rstrip("/") + "/") for p in protected)):
            raise OutputError(f"{self.path}: the store would replace one of this run's inputs")
        cfg = encoder.config
        hq = None
        if self.early_block is not None:
            from ..checkpoints.load import hq_early_dim

            hq = {"hq_early_block": int(self.early_block),
                  "early_shape": [hq_early_dim(cfg), cfg.grid_size, cfg.grid_size]}
        self.store = EmbeddingStore.create(
            self.path, model=cfg.name, config=cfg.to_dict(), embedding_shape=embedding_shape(cfg),
            checkpoint_sha256=self.checkpoint_sha256, dtype=self.dtype,
            tile=None if tile is None else {"size": int(tile), "halo": int(halo)}, hq=hq)
        self.out_dtype = torch.float16 if self.store.identity["dtype"] == "float16" else torch.float32
        self.writer = self.store.writer(model=cfg.name, checkpoint_sha256=self.checkpoint_sha256,
                                        samvit_version=__version__,
                                        compute_dtype=str(encoder.dtype).replace("torch.", ""),
                                        name=f"rank{rank}" if world > 1 else None, durable=self.durable,
                                        allow_mixed_dtypes=self.allow_mixed_dtypes)
        self.put, self.put_alias = self.writer.put, self.writer.put_alias
        self.commit, self.close = self.writer.commit, self.writer.close
        return {k: self.store.record(k)["sha256"] for k in self.store.keys()}

    def finish(self, report: "EmbedReport", rank: int) -> None:
        """Rank 0 lists the run's failures, one JSON object a line."""
        if rank == 0:
            path = self.report_path or _join(self.store.path, "failures.jsonl")
            text = "".join(json.dumps(item) + "\n" for item in sorted(report.failed, key=lambda d: d["key"]))
            try:
                if is_url(path):  # an object PUT is atomic
                    fs, obj = filesystem(path)
                    fs.pipe_file(obj, text.encode())
                else:
                    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                        f.write(text)
            except OSError as e:  # the failures are still in the report (the CLI prints them): say why not here
                self.report_error = f"{path}: cannot write the failure report ({e.strerror or e})"


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


Sink = Any  # FileSink, StoreSink, or any object with their methods


class _WriteBehind:
    """A thread that puts finished items into the sink and commits whenever it has caught up."""

    def __init__(self, writer: "Sink", max_items: int) -> None:
        self.writer = writer
        self.queue: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=max(2, max_items))
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="samvit-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                job = self.queue.get()
                if job is None:
                    break
                kind, args, kwargs = job
                getattr(self.writer, kind)(*args, **kwargs)
                if self.queue.empty():
                    self.writer.commit()
            self.writer.close()
        except BaseException as e:  # surfaced in the main thread
            self.error = e

    def submit(self, kind: str, *args, **kwargs) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((kind, args, kwargs), timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


def default_workers() -> int:
    """Decoding workers: half the CPU cores, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@torch.inference_mode()
def encode_batch(encoder: ImageEncoder, items: Sequence[PreparedImage]) -> torch.Tensor:
    """Run the encoder on prepared images; returns float32 embeddings on the CPU."""
    x = collate(items).to(device=encoder.device, dtype=encoder.dtype)
    return encoder(x).float().cpu()


def embed(encoder: ImageEncoder, items: Sequence[Item], sink: Sink, *, batch_size: int = 1,
          workers: Optional[int] = None, tile: Optional[int] = None, halo: int = 0,
          max_pixels: int = DEFAULT_MAX_PIXELS, progress: ProgressArg = None,
          early_block: Optional[int] = None) -> EmbedReport:
    """Embed (path, key) items into a sink; a bad input is reported and skipped, the rest go on.

    Args:
        encoder: the image encoder (its device and dtype are used as they are).
        items: (path, key) pairs, e.g. from samvit.data.sources.collect_inputs.
        sink: FileSink(out_dir, ...) or StoreSink(path, ...).
        batch_size: images (or tiles) per forward pass. workers: DataLoader decoding processes (None: half the
            CPU cores, 1 to 8; 0: in this process).
        tile, halo: embed tiles of SIZE pixels grown by halo pixels (StoreSink only; see samvit.data.tiles).
        max_pixels: larger images are refused (decompression bombs).
        progress: a callback progress(done, total, failed=n), or None/True/False for a tqdm bar by the rule of
            samvit.runtime.progress_enabled; shown on rank 0 only.
        early_block: HQ-SAM: also keep the output of this encoder block (checkpoints.load.hq_early_block) as each
            file's `early_features`, or in the store beside each embedding (StoreSink(..., early_block=...)); no tiles.
    Returns:
        the report of all ranks together. Under torch.distributed (initialised by the caller, see
        samvit.runtime.init_distributed) each rank takes items[rank::world_size].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if halo and tile is None:
        raise ValueError("halo needs tile: pass a tile size as well")
    if early_block is not None and tile is not None:
        raise ValueError("HQ-SAM's early encoder features are not kept for tiled embeddings (no --tile)")
    if isinstance(sink, StoreSink) and sink.early_block != early_block:
        raise ValueError("embed: the StoreSink's early_block and embed's early_block differ")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    device, compute_dtype = encoder.device, encoder.dtype
    done = sink.open(encoder, tile, halo, rank, world, items=items)
    by_sha = {sha: k for k, sha in done.items()}
    shard = list(items)[rank::world]
    workers = default_workers() if workers is None else workers
    loader = DataLoader(_Units(shard, encoder.config.img_size, done, by_sha, tile, halo, max_pixels),
                        batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=max(2, -(-2 * batch_size // workers)) if workers else None)
    report = EmbedReport(total=len(shard))
    pending: List[Tuple[Dict[str, Any], torch.Tensor]] = []  # (unit, input tensor) waiting for a forward pass
    partial: Dict[str, Dict[str, list]] = {}  # key -> {"units", "outputs"}, per tile, until all tiles are encoded
    failed_keys: set = set()  # keys refused for non-finite output (their later tiles are dropped)
    start = time.perf_counter()
    behind = _WriteBehind(sink, max_items=2 * batch_size + 2)
    count = [0]
    desc = "embed" + (f" (rank 0 of {world})" if world > 1 else "")
    with progress_callback(progress if rank == 0 else False, desc, "img", total=len(shard)) as bar:

        def advance() -> None:
            count[0] += 1
            bar(count[0], len(shard), **({"failed": len(report.failed)} if report.failed else {}))

        def forward(units: List[Tuple[Dict[str, Any], torch.Tensor]]) -> None:
            x = torch.stack([t for _, t in units]).to(device=device, dtype=compute_dtype, non_blocking=True)
            early = None
            with torch.inference_mode():
                if early_block is None:
                    out = encoder(x).to(sink.out_dtype).cpu()
                else:
                    out, early = encode_hq(encoder, x, early_block)
                    out, early = out.to(sink.out_dtype).cpu(), early.to(sink.out_dtype).cpu()
            report.encoded_rows += len(units)
            finite = torch.isfinite(out).flatten(1).all(1).tolist()  # NaN weights, or overflow in float16
            if early is not None:
                finite = [a and b for a, b in zip(finite, torch.isfinite(early).flatten(1).all(1).tolist())]
            for i, ((u, _), emb, ok) in enumerate(zip(units, out, finite)):
                if not ok or u["key"] in failed_keys:
                    if u["key"] not in failed_keys:
                        failed_keys.add(u["key"])
                        partial.pop(u["key"], None)
                        report.failed.append({"key": u["key"], "path": u["path"], "reason": (
                            f"{u['path']}: the encoder gave NaN or infinite values (damaged weights, or too large "
                            f"for {str(sink.out_dtype).replace('torch.', '')}); not written")})
                        advance()
                    continue
                n = u["n_tiles"]
                state = partial.setdefault(u["key"], {"units": [None] * n, "outputs": [None] * n})
                state["units"][u["tile_index"]], state["outputs"][u["tile_index"]] = u, emb
                if any(o is None for o in state["outputs"]):
                    continue
                del partial[u["key"]]
                tiled = tile is not None
                behind.submit("put", u["key"], torch.stack(state["outputs"]) if tiled else emb, sha256=u["sha256"],
                              original_size=u["original_size"], input_size=None if tiled else u["input_size"],
                              tiles=[v["tile"] for v in state["units"]] if tiled else None,
                              **({} if early is None else {"early_features": early[i].clone()}))
                report.embedded += 1
                advance()

        try:
            for unit in loader:
                status = unit["status"]
                if status == "ok":
                    pending.append((unit, unit.pop("tensor")))
                    if len(pending) >= batch_size:
                        forward(pending[:batch_size])
                        del pending[:batch_size]
                    continue
                if status == "done":
                    report.skipped += 1
                elif status == "reuse":
                    behind.submit("put_alias", unit["key"], unit["source"])
                    report.reused += 1
                else:
                    partial.pop(unit["key"], None)  # tiles of it already encoded or waiting are dropped
                    pending[:] = [p for p in pending if p[0]["key"] != unit["key"]]
                    report.failed.append({"key": unit["key"], "path": unit["path"], "reason": unit["reason"]})
                advance()
            while pending:
                forward(pending[:batch_size])
                del pending[:batch_size]
        finally:
            behind.close()
    report.seconds = time.perf_counter() - start
    if distributed:
        gathered: List[Optional[EmbedReport]] = [None] * world
        torch.distributed.all_gather_object(gathered, report)
        report = EmbedReport()
        for r in gathered:
            report.merge(r)
    sink.finish(report, rank)
    return report
