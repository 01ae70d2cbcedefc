"""Ray Data adapters of the embed pipeline: decode on CPU tasks, the encoder in an actor pool, the store as a sink.

    import ray, samvit.ray
    ds = ray.data.from_items([{"path": p, "key": k} for p, k in samvit.data.sources.collect_inputs(["s3://b/in/"])])
    ds = ds.map_batches(samvit.ray.decode, fn_kwargs={"img_size": 1024}, batch_size=8)          # CPU tasks
    ds = ds.map_batches(samvit.ray.Embedder, fn_constructor_kwargs={"checkpoint": "vit_b"},
                        concurrency=2, batch_size=4, num_gpus=1)                              # actor pool
    ds.write_datasink(samvit.ray.StoreDatasink("s3://b/embeddings.zarr", ...))   # or ds.write_parquet(...)

Every stage is the single-process pipeline's: `decode` runs embeddings.pipeline.prepare_units (hash, skip, decode,
preprocess, tiles), `Embedder` loads the encoder with checkpoints.load.load_encoder, and `StoreDatasink` writes
through the pipeline's StoreSink (one writer session per write task). A task or actor that dies is retried by
Ray; a write retried after its commit commits the same keys again, and the store keeps one item per key, so the
store ends with every input exactly once. `embed_ray` is what `samvit embed --engine ray` runs. `import samvit`
never imports ray; this module does.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data.images import DEFAULT_MAX_PIXELS

COLUMNS = ("key", "path", "status", "reason", "source", "sha256", "original_size", "input_size", "tiles")


def decode(batch: Dict[str, Any], *, img_size: int = 1024, done: Optional[Dict[str, str]] = None,
           tile: Optional[int] = None, halo: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dict[str, Any]:
    """A map_batches function: rows {"path", "key"} -> one row per input with its status ('ok', 'done', 'reuse',
    'failed'), its sizes, tiles, and "tensor": the prepared model input(s) (T, 3, S, S) float32 as bytes
    (empty unless ok). `done`: key -> content sha256 of what the store holds (skipped, or reused by content)."""
    from .embeddings.pipeline import prepare_units

    done = done or {}
    by_sha = {sha: k for k, sha in done.items()}
    out: Dict[str, List[Any]] = {c: [] for c in COLUMNS + ("tensor", "n_tiles")}
    for path, key in zip(batch["path"], batch["key"]):
        units = list(prepare_units(str(path), str(key), img_size, done, by_sha, tile, halo, max_pixels))
        last = units[-1]
        ok = [u for u in units if u["status"] == "ok"]
        if last["status"] != "ok":
            ok = []
        row = {"key": str(key), "path": str(path), "status": last["status"], "reason": last.get("reason", ""),
               "source": last.get("source", ""), "sha256": last.get("sha256", ""),
               "original_size": json.dumps(last.get("original_size")), "input_size": json.dumps(
                   None if tile is not None else last.get("input_size")),
               "tiles": json.dumps([u["tile"] for u in ok] if tile is not None and ok else None)}
        for c in COLUMNS:
            out[c].append(row[c])
        out["tensor"].append(np.stack([u["tensor"].numpy() for u in ok]).tobytes() if ok else b"")
        out["n_tiles"].append(len(ok))
    return {c: np.array(v, dtype=object) if c == "tensor" else np.array(v) for c, v in out.items()}


class Embedder:
    """A map_batches callable class (an actor pool): rows from `decode` -> the same rows with "embedding", the
    encoder's output (n_tiles, *shape) in `out_dtype` as bytes (empty unless ok), and "tensor" dropped. Rows from
    ray.data.read_images (an "image" column, HxWx3 uint8) are preprocessed here first (key: their "path").

    Args: checkpoint, model, device, dtype, img_size: as load_encoder's (device None: the GPU Ray gave this actor,
    else the CPU); batch_size: images (tiles) per forward pass; out_dtype: "float16" (the store's default) or
    "float32"; threads: torch threads (None: Ray's setting, the actor's num_cpus)."""

    def __init__(self, checkpoint: Any, model: Optional[str] = None, *, device: Optional[str] = None,
                 dtype: str = "auto", img_size: Optional[int] = None, batch_size: int = 1,
                 out_dtype: str = "float16", threads: Optional[int] = None) -> None:
        import torch

        from .checkpoints.load import load_encoder
        from .runtime import resolve_device

        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(model, checkpoint, device=resolve_device(device), dtype=dtype,
                                    img_size=img_size)
        self.batch_size = max(1, int(batch_size))
        self.out_dtype = {"float16": torch.float16, "float32": torch.float32}[out_dtype]

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import torch

        if "image" in batch and "tensor" not in batch:
            batch = self._from_images(batch)
        s = self.encoder.config.img_size
        n = len(batch["key"])
        status = [str(v) for v in batch["status"]]
        reason = [str(v) for v in batch["reason"]]
        inputs, owners = [], []
        for i in range(n):
            if status[i] == "ok":
                t = np.frombuffer(batch["tensor"][i], dtype=np.float32).reshape(int(batch["n_tiles"][i]), 3, s, s)
                inputs.append(torch.from_numpy(t.copy()))
                owners += [i] * t.shape[0]
        outputs: List[Any] = []
        if inputs:
            x = torch.cat(inputs)
            with torch.inference_mode():
                for j in range(0, x.shape[0], self.batch_size):
                    xb = x[j:j + self.batch_size].to(device=self.encoder.device, dtype=self.encoder.dtype)
                    outputs.append(self.encoder(xb).to(self.out_dtype).cpu())
        out = torch.cat(outputs) if outputs else None
        embeddings = [b""] * n
        for i in range(n):
            if status[i] != "ok":
                continue
            rows = out[[r for r, o in enumerate(owners) if o == i]]
            if not torch.isfinite(rows).all():
                status[i], reason[i] = "failed", (
                    f"{batch['path'][i]}: the encoder gave NaN or infinite values (damaged weights, or too large "
                    f"for {str(self.out_dtype).replace('torch.', '')}); not written")
                continue
            embeddings[i] = rows.numpy().tobytes()
        result = {c: np.asarray(batch[c]) for c in COLUMNS}
        result.update(status=np.array(status), reason=np.array(reason), n_tiles=np.asarray(batch["n_tiles"]),
                      embedding=np.array(embeddings, dtype=object))
        return result

    def _from_images(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Rows of ray.data.read_images(..., include_paths=True) -> decode's rows (no content hash: sha256 '')."""
        from .data.images import load_image
        from .data.preprocess import prepare

        keys = [str(p) for p in batch.get("path", range(len(batch["image"])))]
        out: Dict[str, List[Any]] = {c: [] for c in COLUMNS + ("tensor", "n_tiles")}
        for key, img in zip(keys, batch["image"]):
            rgb = load_image(np.asarray(img))
            prepared = prepare(rgb, self.encoder.config.img_size)
            row = {"key": key, "path": key, "status": "ok", "reason": "", "source": "", "sha256": "",
                   "original_size": json.dumps(list(rgb.shape[:2])),
                   "input_size": json.dumps(list(prepared.input_size)), "tiles": "null"}
            for c in COLUMNS:
                out[c].append(row[c])
            out["tensor"].append(prepared.tensor.numpy().tobytes())
            out["n_tiles"].append(1)
        return {c: np.array(v, dtype=object) if c == "tensor" else np.array(v) for c, v in out.items()}


def embedding(row: Dict[str, Any], shape: Sequence[int] = (256, 64, 64), dtype: str = "float16") -> np.ndarray:
    """The embedding(s) of an Embedder output row (e.g. read back from Parquet): (n_tiles, *shape)."""
    return np.frombuffer(row["embedding"], dtype=dtype).reshape(int(row["n_tiles"]), *shape)


def _datasink_class():
    """StoreDatasink, a ray.data.Datasink subclass: made on first use, so that importing this module is fast."""
    if "StoreDatasink" in globals():
        return globals()["StoreDatasink"]
    from ray.data import Datasink

    class StoreDatasink(Datasink):
        """Write Embedder rows into an EmbeddingStore (local or object storage) through the pipeline's StoreSink:
        one writer session per write task, committed when the task's blocks are written. The store must exist
        (embed_ray creates it, or EmbeddingStore.create). write returns the task's counts and failures."""

        def __init__(self, path: str, checkpoint_sha256: str, config: Any, compute_dtype: str = "float32",
                     tile: Optional[int] = None, halo: int = 0) -> None:
            self.path, self.checkpoint_sha256, self.config = path, checkpoint_sha256, config
            self.compute_dtype, self.tile, self.halo = compute_dtype, tile, halo
            self.result: Dict[str, Any] = {}

        def write(self, blocks, ctx) -> Dict[str, Any]:
            from ray.data.block import BlockAccessor

            from .embeddings.pipeline import StoreSink
            from .embeddings.store import embedding_shape

            sink = StoreSink(self.path, self.checkpoint_sha256)
            fake = SimpleNamespace(config=self.config, dtype=self.compute_dtype)  # what StoreSink.open reads
            sink.open(fake, self.tile, self.halo, rank=int(getattr(ctx, "task_idx", 0)), world=2)
            shape = embedding_shape(self.config)
            dtype = sink.store.dtype
            counts = {"embedded": 0, "skipped": 0, "reused": 0, "failed": []}
            for block in blocks:
                for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                    st = row["status"]
                    if st == "ok":
                        tiles = json.loads(row["tiles"])
                        emb = np.frombuffer(row["embedding"], dtype=dtype).reshape(int(row["n_tiles"]), *shape)
                        sink.put(row["key"], emb if tiles is not None else emb[0], sha256=row["sha256"],
                                 original_size=json.loads(row["original_size"]),
                                 input_size=json.loads(row["input_size"]), tiles=tiles)
                        counts["embedded"] += 1
                    elif st == "reuse":
                        sink.put_alias(row["key"], row["source"])
                        counts["reused"] += 1
                    elif st == "done":
                        counts["skipped"] += 1
                    else:
                        counts["failed"].append({"key": row["key"], "path": row["path"], "reason": row["reason"]})
            sink.close()
            return counts

        def on_write_complete(self, write_result) -> None:
            total = {"embedded": 0, "skipped": 0, "reused": 0, "failed": []}
            for r in write_result.write_returns:
                for k in ("embedded", "skipped", "reused"):
                    total[k] += r[k]
                total["failed"] += r["failed"]
            self.result = total

    globals()["StoreDatasink"] = StoreDatasink
    return StoreDatasink


def __getattr__(name: str) -> Any:
    if name == "StoreDatasink":
        return _datasink_class()
    raise AttributeError(f"module 'samvit.ray' has no attribute {name!r}")


def embed_ray(checkpoint: str, items: Sequence[Tuple[str, str]], store: str, *, model: Optional[str] = None,
              dtype: str = "auto", device: Optional[str] = None, img_size: Optional[int] = None,
              batch_size: int = 1, store_dtype: Optional[str] = None, tile: Optional[int] = None, halo: int = 0,
              max_pixels: int = DEFAULT_MAX_PIXELS, actors: int = 1, gpus_per_actor: float = 0.0,
              cpus_per_actor: Optional[float] = None, threads_per_actor: Optional[int] = None,
              decode_cpus: float = 1.0, decode_batch: int = 4, report_path: Optional[str] = None,
              parquet: Optional[str] = None, protected: Sequence[str] = ()):
    """`samvit embed --engine ray`: embed (path, key) items on the Ray cluster this process is connected to
    (ray.init first) into the store at `store` (or, with parquet=DIR, Embedder rows as Parquet files).
    actors: encoder actors (each gpus_per_actor GPUs, cpus_per_actor CPUs (Ray's default 1), threads_per_actor
    torch threads); decode_cpus: CPUs each decode task reserves. Returns the pipeline's EmbedReport (seconds: wall
    time of the Ray job, the driver's checks included)."""
    import time

    import ray
    import torch

    from .checkpoints.load import load_encoder
    from .checkpoints.registry import checkpoint_sha256
    from .embeddings.pipeline import EmbedReport, StoreSink
    from .runtime import resolve_dtype

    start = time.perf_counter()
    encoder = load_encoder(model, checkpoint, device="cpu", dtype=None, img_size=img_size)  # on the driver: the
    cfg = encoder.config  # config, and a clear error about the checkpoint before any job starts
    del encoder
    try:  # the dtype the actors compute in, recorded with every item
        compute = str(resolve_dtype(dtype, torch.device(device or "cpu"))).replace("torch.", "")
    except Exception:  # e.g. "auto" for a GPU this driver does not have
        compute = str(dtype)
    sha = checkpoint_sha256(checkpoint)
    done: Dict[str, str] = {}
    sink = None
    if parquet is None:
        sink = StoreSink(store, sha, dtype=store_dtype, report_path=report_path, protected=protected)
        done = sink.open(SimpleNamespace(config=cfg, dtype=compute), tile, halo, 0, 1, items=items)  # dtype: its name
        sink.writer.close()  # the driver's session writes nothing; write tasks have their own
        out_dtype = sink.store.identity["dtype"]
    else:
        out_dtype = store_dtype or "float16"
    ds = ray.data.from_items([{"path": p, "key": k} for p, k in items],
                             override_num_blocks=max(1, min(len(items), 4 * max(1, actors))))
    ds = ds.map_batches(decode, batch_size=decode_batch, num_cpus=decode_cpus, fn_kwargs={
        "img_size": cfg.img_size, "done": done, "tile": tile, "halo": halo, "max_pixels": max_pixels})
    resources = {k: v for k, v in (("num_gpus", gpus_per_actor), ("num_cpus", cpus_per_actor)) if v}
    ds = ds.map_batches(Embedder, batch_size=batch_size, concurrency=actors, **resources,
                        fn_constructor_kwargs={"checkpoint": checkpoint, "model": model, "device": device,
                                               "dtype": dtype, "img_size": img_size, "batch_size": batch_size,
                                               "out_dtype": out_dtype, "threads": threads_per_actor})
    report = EmbedReport(total=len(items))
    if parquet is not None:
        ds.write_parquet(parquet)
        stats = ray.data.read_parquet(parquet).select_columns(["key", "path", "status", "reason"]).to_pandas()
        report.embedded = int((stats["status"] == "ok").sum())
        report.failed = [{"key": r.key, "path": r.path, "reason": r.reason}
                         for r in stats.itertuples() if r.status == "failed"]
    else:
        datasink = _datasink_class()(store, sha, cfg, compute, tile, halo)
        ds.write_datasink(datasink)
        res = datasink.result
        report.embedded, report.skipped, report.reused, report.failed = (
            res["embedded"], res["skipped"], res["reused"], res["failed"])
    report.seconds = time.perf_counter() - start
    if sink is not None:
        sink.finish(report, 0)
    return report
