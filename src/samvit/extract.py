"""Collections -> EmbeddingStore: decode in DataLoader workers, encode in batches, write behind, resume, torchrun.

The pipeline of `samvit embed --store`: every rank takes a disjoint shard of the sorted inputs; its DataLoader
workers hash each file (sha256 of its bytes), skip what the store already holds under the same key and content,
decode and preprocess the rest (whole images, or tiles); the main thread runs the encoder on batches while a
writer thread converts, writes, fsyncs and commits the finished items, so decoding and writing hide behind compute.

Tiling (`tile=SIZE, halo=PIXELS`): see samvit.data.tiles; tiles are stored row-major with their boxes.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .modeling.encoder import ImageEncoder
from .store import EmbeddingStore, StoreWriter, embedding_shape
from .data.images import DEFAULT_MAX_PIXELS, load_image
from .data.preprocess import prepare
from .data.tiles import tile_grid
from .checkpoints.files import sha256_file

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
            yield from self._units(path, key)

    def _units(self, path: str, key: str) -> Iterator[Dict[str, Any]]:
        base = {"key": key, "path": path}
        try:
            sha = sha256_file(path)
        except OSError as e:
            reason = f"{path}: cannot read file ({type(e).__name__}: {e.strerror or e})"
            yield dict(base, status="failed", reason=reason)
            return
        if self.done.get(key) == sha:
            yield dict(base, status="done")
            return
        if sha in self.by_sha:
            yield dict(base, status="reuse", source=self.by_sha[sha])
            return
        try:
            rgb = load_image(path, max_pixels=self.max_pixels)
            h, w = rgb.shape[:2]
            grid = [(None, None)] if self.tile is None else tile_grid(h, w, self.tile, self.halo)
            for i, (core, box) in enumerate(grid):  # one tile at a time: a huge image never sits in memory twice
                crop = rgb if box is None else rgb[box[1]:box[3], box[0]:box[2]]
                prepared = prepare(crop, self.img_size)
                x, input_size = prepared.tensor, list(prepared.input_size)
                tile = None if box is None else {"box": list(box), "core": list(core), "input_size": input_size}
                yield dict(base, status="ok", sha256=sha, original_size=[h, w], input_size=input_size, tile=tile,
                           tile_index=i, n_tiles=len(grid), tensor=x)
        except Exception as e:  # ImageError carries the reason; anything else is reported by type
            reason = str(e) if isinstance(e, ValueError) else f"{path}: {type(e).__name__}: {e}"
            yield dict(base, status="failed", reason=reason)  # after any tiles already sent: the item is dropped


@dataclass
class ExtractReport:
    """Counts of one run (all ranks together when distributed) and the failed inputs with their reasons."""

    total: int = 0
    embedded: int = 0
    skipped: int = 0  # already in the store with the same content
    reused: int = 0  # same content as another key already in the store: committed without encoding
    failed: List[Dict[str, str]] = field(default_factory=list)  # {"key", "path", "reason"}
    seconds: float = 0.0
    encoded_rows: int = 0  # forward-pass inputs (tiles count one each)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: "ExtractReport") -> None:
        for k in ("total", "embedded", "skipped", "reused", "encoded_rows"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.failed += other.failed
        self.seconds = max(self.seconds, other.seconds)


class _WriteBehind:
    """A thread that puts finished items into the store and commits whenever it has caught up."""

    def __init__(self, writer: StoreWriter, max_items: int) -> None:
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


def extract(encoder: ImageEncoder, items: Sequence[Tuple[str, str]], store_path: str, *, checkpoint_sha256: str,
            batch_size: int = 1, workers: Optional[int] = None, tile: Optional[int] = None, halo: int = 0,
            store_dtype: Optional[str] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            report_path: Optional[str] = None, progress: Optional[bool] = None, durable: bool = True
            ) -> ExtractReport:
    """Embed (path, key) items into the store at store_path, resuming; returns the report of all ranks.

    Under torch.distributed (initialised by the caller) each rank takes items[rank::world_size]. Failed inputs are
    listed in report_path (default store_path/failures.jsonl, rewritten every run) and skipped; the rest are written.
    """
    from ._version import __version__

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if halo and tile is None:
        raise ValueError("halo needs tile: pass a tile size as well")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    cfg = encoder.config
    param = next(encoder.parameters())
    device, compute_dtype = param.device, encoder.dtype
    store = EmbeddingStore.create(
        store_path, model=cfg.name, config=cfg.to_dict(), embedding_shape=embedding_shape(cfg),
        checkpoint_sha256=checkpoint_sha256, dtype=store_dtype,
        tile=None if tile is None else {"size": int(tile), "halo": int(halo)})
    out_dtype = torch.float16 if store.identity["dtype"] == "float16" else torch.float32
    done = {k: store.record(k)["sha256"] for k in store.keys()}
    by_sha = {sha: k for k, sha in done.items()}
    shard = list(items)[rank::world]
    writer = store.writer(model=cfg.name, checkpoint_sha256=checkpoint_sha256, samvit_version=__version__,
                          compute_dtype=str(compute_dtype).replace("torch.", ""),
                          name=f"rank{rank}" if distributed else None, durable=durable)
    workers = default_workers() if workers is None else workers
    loader = DataLoader(_Units(shard, cfg.img_size, done, by_sha, tile, halo, max_pixels), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=max(2, -(-2 * batch_size // workers)) if workers else None)
    report = ExtractReport(total=len(shard))
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    from tqdm import tqdm

    bar = tqdm(total=len(shard), unit="img", desc="embed" + (f" (rank 0 of {world})" if world > 1 else ""),
               disable=not show, dynamic_ncols=True)
    pending: List[Tuple[Dict[str, Any], torch.Tensor]] = []  # (unit, input tensor) waiting for a forward pass
    partial: Dict[str, Dict[str, list]] = {}  # key -> {"units", "outputs"}, per tile, until all tiles are encoded
    start = time.perf_counter()
    behind = _WriteBehind(writer, max_items=2 * batch_size + 2)

    def forward(units: List[Tuple[Dict[str, Any], torch.Tensor]]) -> None:
        x = torch.stack([t for _, t in units]).to(device=device, dtype=compute_dtype, non_blocking=True)
        with torch.inference_mode():
            out = encoder(x).to(out_dtype).cpu()
        report.encoded_rows += len(units)
        for (u, _), emb in zip(units, out):
            n = u["n_tiles"]
            state = partial.setdefault(u["key"], {"units": [None] * n, "outputs": [None] * n})
            state["units"][u["tile_index"]], state["outputs"][u["tile_index"]] = u, emb
            if any(o is None for o in state["outputs"]):
                continue
            del partial[u["key"]]
            tiled = tile is not None
            behind.submit("put", u["key"], torch.stack(state["outputs"]) if tiled else emb, sha256=u["sha256"],
                          original_size=u["original_size"], input_size=None if tiled else u["input_size"],
                          tiles=[v["tile"] for v in state["units"]] if tiled else None)
            report.embedded += 1
            bar.update(1)

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
                bar.set_postfix(failed=len(report.failed))
            bar.update(1)
        while pending:
            forward(pending[:batch_size])
            del pending[:batch_size]
    finally:
        behind.close()
        bar.close()
    report.seconds = time.perf_counter() - start
    if distributed:
        gathered: List[Optional[ExtractReport]] = [None] * world
        torch.distributed.all_gather_object(gathered, report)
        report = ExtractReport()
        for r in gathered:
            report.merge(r)
    if rank == 0:
        _write_report(report_path or os.path.join(store.path, "failures.jsonl"), report.failed)
    return report


def _write_report(path: str, failed: List[Dict[str, str]]) -> None:
    """Failures, one JSON object a line, written atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for item in sorted(failed, key=lambda d: d["key"]):
            f.write(json.dumps(item) + "\n")
    os.replace(tmp, path)


def distributed_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun / with one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"incomplete torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {e}") from None


def init_distributed(device: Optional[str] = None) -> Tuple[torch.device, Optional[Tuple[int, int, int]]]:
    """Initialise torch.distributed when run under torchrun: nccl on cuda:LOCAL_RANK, gloo on CPU.

    Returns (the device this process should use, (rank, world, local_rank) or None). Without torchrun it only
    resolves the device.
    """
    from .runtime import resolve_device

    env = distributed_env()
    dev = resolve_device(device)
    if env is None:
        return dev, None
    rank, world, local_rank = env
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, env
