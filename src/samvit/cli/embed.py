"""`samvit embed`: images -> SAM image embeddings, one .safetensors file per image, or into an embedding store.

Both run the one embed loop (samvit.embeddings.pipeline): DataLoader workers, batches, bad files reported and
skipped, torchrun (`torchrun --nproc_per_node=N -m samvit embed ...`); with --store PATH also resume by content
hash and tiles.
"""
from __future__ import annotations

import argparse
import os

from .options import add_checkpoint, add_device, add_dtype, add_img_size, add_model, add_quiet, check_img_size

HELP = "embed images into SAM image embeddings (one .safetensors per image, or --store PATH)"

STORE_ONLY = ("store_dtype", "tile", "halo", "report", "allow_mixed_dtypes")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (searched recursively), globs, or .txt files listing paths")
    add_model(p)
    add_checkpoint(p)
    p.add_argument("--out", default="embeddings", help="output directory of per-file embeddings, without --store "
                   "(default: ./embeddings); one file per input at its key's path, never outside it; a rerun skips "
                   "what this model and checkpoint already wrote from the same file content")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs that this model and checkpoint "
                   "did not write (refused otherwise), and re-embed those it did")
    p.add_argument("--batch-size", type=int, default=1, help="images (or tiles) per forward pass (default 1)")
    add_device(p, torchrun=True)
    add_dtype(p)
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="what runs the encoder: torch (default), or openvino (CPU, float32, outputs within 1e-4 of "
                   "torch's; faster on some CPUs, see docs/speed.md; exports the model first, which takes a while; "
                   "needs the openvino package)")
    add_img_size(p)
    add_quiet(p)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader processes decoding images (default: half the CPU cores, 1 to 8; 0 = in-process)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than N (decompression bombs; default 178956970)")
    g = p.add_argument_group("collections (with --store)")
    g.add_argument("--store", default=None, metavar="PATH",
                   help="write into the embedding store at PATH (created if new; resumes: what it holds with the "
                   "same file content is skipped)")
    g.add_argument("--store-dtype", default=None, choices=["float16", "float32"],
                   help="dtype of the stored embeddings (default float16 for a new store)")
    g.add_argument("--tile", type=int, default=None, metavar="SIZE",
                   help="embed overlapping tiles: a SIZE-pixel grid over the original image, each cell plus --halo")
    g.add_argument("--halo", type=int, default=None, metavar="PIXELS",
                   help="pixels added on every side of each tile, clipped at the image border (default 0)")
    g.add_argument("--allow-mixed-dtypes", action="store_true", default=None,
                   help="add to a store that holds embeddings computed in another --dtype (refused otherwise: "
                   "embeddings computed in bfloat16 and float32 differ by up to a few 1e-2)")
    g.add_argument("--report", default=None, metavar="PATH",
                   help="where to list failed inputs as JSON lines (default: STORE/failures.jsonl)")
    r = p.add_argument_group("cluster (Ray Data; see docs/scale.md)")
    r.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (and its DataLoader workers, or torchrun ranks); ray: a Ray Data job, "
                   "decoding on CPU tasks and encoding in an actor pool (needs samvit[ray])")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, else a "
                   "local cluster started for this run")
    r.add_argument("--actors", type=int, default=None, metavar="N",
                   help="--engine ray: encoder actors (default 1); each takes one GPU when --device cuda")
    r.add_argument("--parquet", default=None, metavar="DIR",
                   help="--engine ray: write the embeddings as Parquet files into DIR instead of a store")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..checkpoints.load import load_encoder_hq
    from ..checkpoints.registry import checkpoint_sha256, resolve_checkpoint
    from ..data.images import DEFAULT_MAX_PIXELS
    from ..data.remote import is_url
    from ..data.sources import collect_inputs
    from ..embeddings.pipeline import FileSink, StoreSink, embed
    from ..runtime import TqdmProgress, describe_dtype, init_distributed, local_rank_zero_first, resolve_dtype
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.engine == "ray":
        return _run_ray(args)
    for opt in ("ray_address", "actors", "parquet"):
        if getattr(args, opt) is not None:
            raise UserError(f"--{opt.replace('_', '-')} applies with --engine ray")
    if args.store is None:
        given = ["--" + k.replace("_", "-") for k in STORE_ONLY if getattr(args, k) is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --store PATH")
    elif args.force:
        raise UserError("--force applies to per-file outputs (--out); a store resumes, and keeps the latest "
                        "embedding of a key whose file changed")
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be at least 1 pixel, got {args.tile}")
    if args.halo is not None and (args.halo < 0 or args.tile is None):
        raise UserError("--halo needs --tile and must be 0 or more pixels")
    check_img_size(args.img_size)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.backend == "openvino" and (args.dtype not in (None, "float32") or args.device not in (None, "cpu")):
        raise UserError("--backend openvino runs float32 on the CPU: leave out --dtype and --device (or give "
                        "float32 and cpu)")
    if args.store is None and is_url(args.out):
        raise UserError(f"--out {args.out}: per-file outputs are written to a local folder; write to object "
                        "storage with --store URL")
    items = collect_inputs(args.inputs)
    if not items:
        raise UserError(f"no images found in {args.inputs}")
    device, env = init_distributed(args.device)
    rank = env[0] if env else 0
    quiet = args.quiet or rank != 0
    try:
        with local_rank_zero_first(env):  # local rank 0 fetches a named checkpoint, the others find it cached
            checkpoint = resolve_checkpoint(args.checkpoint, progress=False if quiet else None)
        asked = args.dtype if args.backend == "torch" else "float32"
        dtype = resolve_dtype(asked, device)
        if not quiet:
            print(f"samvit embed: {describe_dtype(dtype, asked, device)}"
                  + ("; backend openvino (exporting the model first)" if args.backend == "openvino" else ""),
                  file=sys.stderr)
        encoder, early_block = load_encoder_hq(args.model, checkpoint, device=device, dtype=dtype,
                                               img_size=args.img_size)
        if early_block is not None and (args.tile is not None or args.backend != "torch"):
            raise UserError(f"{args.checkpoint} is HQ-SAM, whose decoder also needs the encoder's early features: "
                            "they are kept by the torch backend for whole images only (no --tile, no --backend "
                            "openvino)")
        if args.backend == "openvino":
            from ..export import OpenVINOEncoder

            encoder = OpenVINOEncoder(encoder)
        sha = checkpoint_sha256(checkpoint)
        protected = [checkpoint] + [a for a in args.inputs if os.path.isfile(a)]  # list files too
        hq_meta = {} if early_block is None else {"hq_early_block": str(early_block)}
        sink = FileSink(args.out, sha, hq_meta, force=args.force, protected=protected) if args.store is None else \
            StoreSink(args.store, sha, dtype=args.store_dtype, report_path=args.report, protected=protected,
                      allow_mixed_dtypes=bool(args.allow_mixed_dtypes), early_block=early_block)
        with TqdmProgress("embed" + (f" (rank 0 of {env[1]})" if env else ""), "img",
                          enabled=False if quiet else None) as bar:
            report = embed(encoder, items, sink, batch_size=args.batch_size, workers=args.workers, tile=args.tile,
                           halo=args.halo or 0, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=bar,
                           early_block=early_block)
    finally:
        if env is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report_error = getattr(sink, "report_error", None) if rank == 0 else None
    if rank == 0:
        for f in report.failed:
            print(f"failed: {f['reason']}", file=sys.stderr)
        if report_error:
            print(f"samvit embed: error: {report_error}; the failures are listed above", file=sys.stderr)
        if not args.quiet and args.store is None:
            print(f"{report.embedded} embedded into {args.out}, {len(report.failed)} failed", file=sys.stderr)
        elif not args.quiet:
            report_path = args.report or args.store.rstrip("/") + "/failures.jsonl"
            print(f"{report.total} inputs: {report.embedded} embedded, {report.skipped} already in the store, "
                  f"{report.reused} reused (same content as a stored key), {len(report.failed)} failed; "
                  f"{report.seconds:.1f} s, {report.images_per_second:.2f} images/s"
                  + (f" on {env[1]} processes" if env else "") + f"; store {args.store}"
                  + (f"; failures listed in {report_path}" if report.failed else ""), file=sys.stderr)
    return 2 if report_error else 1 if report.failed else 0


def _run_ray(args: argparse.Namespace) -> int:
    """`samvit embed --engine ray`: the same inputs, checks and store, as a Ray Data job (samvit.ray.embed_ray)."""
    import sys

    from ..checkpoints.registry import resolve_checkpoint
    from ..data.images import DEFAULT_MAX_PIXELS
    from ..data.sources import collect_inputs
    from ..runtime import distributed_env
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if distributed_env() is not None:
        raise UserError("--engine ray runs from one driver process, not under torchrun")
    if (args.store is None) == (args.parquet is None):
        raise UserError("--engine ray writes into --store PATH or --parquet DIR (one of them)")
    if args.parquet is not None and any(getattr(args, k) is not None for k in STORE_ONLY):
        raise UserError("--store-dtype, --tile, --halo and --report apply with --store")
    if args.backend != "torch" or args.force:
        raise UserError("--engine ray runs the torch backend and resumes (no --backend openvino, no --force)")
    if args.batch_size < 1 or (args.actors is not None and args.actors < 1):
        raise UserError("--batch-size and --actors must be at least 1")
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be at least 1 pixel, got {args.tile}")
    if args.halo is not None and (args.halo < 0 or args.tile is None):
        raise UserError("--halo needs --tile and must be 0 or more pixels")
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray Data: pip install 'samvit[ray]'") from None
    from ..ray import embed_ray

    items = collect_inputs(args.inputs)
    if not items:
        raise UserError(f"no images found in {args.inputs}")
    checkpoint = resolve_checkpoint(args.checkpoint, progress=False if args.quiet else None)
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=not args.quiet,
                 logging_level="ERROR")
    try:
        gpu = (args.device or "").startswith("cuda")
        report = embed_ray(str(checkpoint), items, args.store, model=args.model, dtype=args.dtype,
                           device=args.device, img_size=args.img_size, batch_size=args.batch_size,
                           store_dtype=args.store_dtype, tile=args.tile, halo=args.halo or 0,
                           max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, actors=args.actors or 1,
                           gpus_per_actor=1.0 if gpu else 0.0, report_path=args.report, parquet=args.parquet,
                           protected=[str(checkpoint)] + [a for a in args.inputs if os.path.isfile(a)])
    finally:
        if started:
            ray.shutdown()
    for f in report.failed:
        print(f"failed: {f['reason']}", file=sys.stderr)
    if not args.quiet:
        print(f"{report.total} inputs: {report.embedded} embedded, {report.skipped} already in the store, "
              f"{report.reused} reused, {len(report.failed)} failed; {report.seconds:.1f} s, "
              f"{report.images_per_second:.2f} images/s on Ray; " + (f"store {args.store}" if args.store else
                                                                      f"Parquet in {args.parquet}"), file=sys.stderr)
    return 1 if report.failed else 0
