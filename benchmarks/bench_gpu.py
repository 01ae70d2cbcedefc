"""GPU benchmark, one short script for the day a GPU is lent: the ViT-H encoder in bfloat16 at batch 1 and 8 --
samvit with the sdpa_chunked and FlexAttention kernels, eager and torch.compile'd -- against the official
segment-anything code (float32, and bfloat16 autocast) and segment-anything-fast's configuration; then the mask
decoder per prompt, eager and replayed from a CUDA graph. Same random weights everywhere.

    python benchmarks/bench_gpu.py                        # ViT-H, batches 1,8, everything, ~5-8 min on an H100
    python benchmarks/bench_gpu.py --max-minutes 8        # stop starting new runs after 8 minutes (default 9)
    python benchmarks/bench_gpu.py --dry-run --out /tmp/g # CPU, tiny model, every code path but CUDA graphs (a test)

segment-anything-fast (pytorch-labs) is not on PyPI: the PyPI package of that name is FastSAM (a YOLOv8 CNN,
top-level module `fastsam`), not a SAM ViT. When pytorch-labs' `segment_anything_fast` is importable (installed
from its source) it is used; otherwise its configuration is rebuilt on the official encoder (bfloat16 weights,
SDPA with the summed rel-pos bias as a mask, torch.compile) and the rows say "emulated". Per run: s/image,
images/s, peak CUDA memory, TFLOP/s and share of this GPU's bf16 matmul peak (measured in the run), error against
the official float32 output. Writes benchmarks/results/gpu_<model>_<time>.{json,md}. Without --dry-run it needs
CUDA and exits 2 with a clear message elsewhere.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from samvit import EncoderConfig, ImageEncoder, preset
from samvit.bench.peak import matmul_peak
from samvit.bench.peers import official_encoder
from samvit.bench.runner import count_flops
from samvit.bench.weights import random_weights

# name -> (what it is, dtype of the weights, autocast?)
IMPLS: Dict[str, Tuple[str, torch.dtype, bool]] = {  # in run order: the eager ones first, compiles last
    "samvit-sdpa": ("samvit, sdpa_chunked kernel, bf16 weights", torch.bfloat16, False),
    "samvit-flex": ("samvit, FlexAttention kernel (compiled kernel), bf16 weights", torch.bfloat16, False),
    "official": ("official segment-anything, float32 (batch 1: the yardstick)", torch.float32, False),
    "official-bf16": ("official segment-anything, bf16 autocast", torch.float32, True),
    "samvit-sdpa-compiled": ("samvit, sdpa_chunked, whole encoder torch.compile'd", torch.bfloat16, False),
    "sam-fast": ("segment-anything-fast configuration, compiled", torch.bfloat16, False),
    "samvit-flex-compiled": ("samvit, FlexAttention, whole encoder torch.compile'd", torch.bfloat16, False),
}
TINY = EncoderConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                     out_chans=16, name="tiny")


def _sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything-fast's attention (non-Triton path): the decomposed rel-pos bias summed into one mask."""
    from samvit.modeling.attention import rel_pos_terms

    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
    mask = None
    if self.use_rel_pos:
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        mask = (rel_h[..., None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


def _sam_fast_encoder(cfg: EncoderConfig) -> Tuple[torch.nn.Module, bool]:
    """(encoder, emulated?): segment-anything-fast's ImageEncoderViT, or the official one with its attention."""
    try:
        from segment_anything_fast.modeling import ImageEncoderViT  # noqa: F401
        from functools import partial

        enc = ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                              depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                              out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
                              norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_rel_pos=cfg.use_rel_pos,
                              window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes)
        return enc, False
    except ImportError:
        from segment_anything.modeling.image_encoder import Attention

        enc = official_encoder(cfg)
        for m in enc.modules():
            if isinstance(m, Attention):
                m.forward = types.MethodType(_sdpa_attention_forward, m)
        return enc, True


def build(impl: str, cfg: EncoderConfig, sd: Dict[str, torch.Tensor], compile_mode: str, device: torch.device
          ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(forward, note) for one implementation on `device`, weights in the implementation's dtype."""
    _, dtype, _ = IMPLS[impl]
    if impl.startswith("samvit"):
        kernel = "flex" if "flex" in impl else "sdpa_chunked"
        enc = ImageEncoder(cfg, kernel=kernel)
        enc.load_state_dict(sd)
        enc = enc.eval().to(device, dtype)
        if impl.endswith("-compiled"):
            return torch.compile(enc, mode=compile_mode), f"kernel {kernel}, compile mode={compile_mode}"
        return enc, f"kernel {kernel}"
    if impl.startswith("official"):
        enc = official_encoder(cfg)
        enc.load_state_dict(sd)
        return enc.eval().to(device), ""
    if impl == "sam-fast":
        enc, emulated = _sam_fast_encoder(cfg)
        enc.load_state_dict(sd)
        enc = enc.eval().to(device, dtype)  # as segment-anything-fast: every tensor in bfloat16
        note = "emulated on the official code" if emulated else "segment_anything_fast"
        return torch.compile(enc, mode=compile_mode), f"{note}, compile mode={compile_mode}"
    raise ValueError(f"unknown implementation {impl!r}; expected some of {', '.join(IMPLS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
               ) -> Tuple[List[float], List[float], Any]:
    """(warm-up seconds, timed seconds, last result), synchronised around every call."""
    def once() -> Tuple[float, Any]:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    warm = [once()[0] for _ in range(warmup)]
    times, out = [], None
    for _ in range(repeats):
        dt, out = once()
        times.append(dt)
    return warm, times, out


def bench_decoder(device: torch.device, dtype: torch.dtype, prompts: int, warmup: int, repeats: int
                  ) -> List[Dict[str, Any]]:
    """The prompt encoder + mask decoder on one image embedding, `prompts` single-point prompts per call: eager,
    and (CUDA) one captured CUDA graph replayed with new points copied into its static inputs."""
    from samvit import DecoderConfig, SamDecoder

    torch.manual_seed(0)
    dec = SamDecoder(DecoderConfig()).eval().to(device, dtype)
    side = dec.config.image_embedding_size
    emb = torch.randn(1, dec.config.embed_dim, side, side, device=device, dtype=dtype)
    pts = torch.rand(prompts, 1, 2, device=device) * dec.config.input_image_size
    labels = torch.ones(prompts, 1, device=device, dtype=torch.int64)
    rows: List[Dict[str, Any]] = []

    def eager() -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return dec(emb, (pts, labels))

    warm, times, (ref_masks, _) = time_calls(eager, device, warmup, repeats)
    rows.append({"impl": "decoder, eager", "prompts": prompts, "ms_per_call": 1e3 * statistics.median(times),
                 "warmup_s": warm})
    if device.type != "cuda":
        rows.append({"impl": "decoder, CUDA graph", "prompts": prompts, "error": "skipped: no CUDA here"})
        return rows
    static_pts, static_labels = pts.clone(), labels.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():  # warm-up on a side stream before capture
        for _ in range(3):
            dec(emb, (static_pts, static_labels))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        g_masks, g_iou = dec(emb, (static_pts, static_labels))

    def replay() -> torch.Tensor:
        static_pts.copy_(pts)  # a new prompt batch goes into the graph's static input
        graph.replay()
        return g_masks

    warm, times, out = time_calls(replay, device, warmup, repeats)
    rows.append({"impl": "decoder, CUDA graph", "prompts": prompts, "ms_per_call": 1e3 * statistics.median(times),
                 "warmup_s": warm, "max_abs_vs_eager": (out.float() - ref_masks.float()).abs().max().item()})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_h", help="preset (default vit_h)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled implementations")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default 'default'; segment-anything-fast used max-autotune, which "
                        "takes minutes per shape for ViT-H)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decoder-prompts", type=int, default=16, help="single-point prompts per decoder call (0: skip)")
    p.add_argument("--official-fp32-max-batch", type=int, default=1,
                   help="largest batch for the official float32 run (default 1: it is the yardstick)")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="start no new run after this many minutes (the rest are recorded as skipped)")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU with a tiny model, 1 warm-up and 1 repeat: checks every code path but the "
                        "CUDA graph before a GPU is lent")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        print(f"bench_gpu.py: unknown implementations {unknown}; expected some of {', '.join(IMPLS)}", file=sys.stderr)
        return 2
    if args.dry_run:
        device, cfg = torch.device("cpu"), TINY
        args.warmup, args.repeats = 1, 1
        args.decoder_prompts = min(args.decoder_prompts, 2)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    elif not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and a CUDA build of torch; torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Use --dry-run to check the script on the CPU, "
              "benchmarks/bench_encoder.py for the CPU benchmark.", file=sys.stderr)
        return 2
    else:
        device, cfg = torch.device("cuda"), preset(args.model)
    if args.no_compile:
        impls = [i for i in impls if not i.endswith("-compiled") and i != "sam-fast"]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
        torch.backends.cudnn.allow_tf32 = False
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "CPU (dry run)"

    record: Dict[str, Any] = {
        "machine": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "config": cfg.to_dict(), "command": " ".join(["python benchmarks/bench_gpu.py"] + (argv or sys.argv[1:])),
        "dry_run": args.dry_run, "runs": [], "decoder": []}
    record["flops_per_image"], record["flops_source"] = count_flops(cfg)
    peak_raw = matmul_peak(n=256 if args.dry_run else 8192, device=device.type, repeats=3 if args.dry_run else 5)
    record["matmul_peak_tflops"] = peak = {k: v["gflops"] / 1e3 for k, v in peak_raw.items()}
    sd = random_weights(cfg)
    x1 = torch.randn(1, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))

    # The yardstick: the official float32 output of the one image.
    fwd, _ = build("official", cfg, sd, args.compile_mode, device)
    with torch.inference_mode():
        ref = fwd(x1.to(device)).float()
    del fwd
    for impl in impls:
        _, dtype, autocast = IMPLS[impl]
        for b in batches:
            row: Dict[str, Any] = {"impl": impl, "batch": b}
            record["runs"].append(row)
            if impl == "official" and b > args.official_fp32_max_batch:
                row["error"] = f"skipped: batch above --official-fp32-max-batch {args.official_fp32_max_batch}"
                continue
            if time.perf_counter() - t_start > 60 * args.max_minutes:
                row["error"] = f"skipped: past --max-minutes {args.max_minutes}"
                continue
            torch._dynamo.reset()  # drop the previous run's compiled graphs (and their CUDA graph pools)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                fwd, note = build(impl, cfg, sd, args.compile_mode, device)
                x = x1.expand(b, -1, -1, -1).contiguous().to(device, dtype)

                def call() -> torch.Tensor:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                enabled=autocast):
                        return fwd(x)

                warm, times, out = time_calls(call, device, args.warmup, args.repeats)
            except Exception as e:  # one failing implementation (OOM, a compile error) does not stop the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"{impl:22s} b{b:<3d} FAILED {row['error']}", flush=True)
                continue
            s_img = statistics.median(times) / b
            diff = (out.float() - ref).abs()
            row.update(note=note, warmup_s=warm, times_s=times, s_per_image=s_img, images_per_s=1 / s_img,
                       peak_mem_gib=(torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None),
                       tflops=record["flops_per_image"] / s_img / 1e12, max_abs=diff.max().item(),
                       mean_abs=diff.mean().item(),
                       cosine=F.cosine_similarity(out.double().flatten(), ref.expand_as(out).double().flatten(),
                                                  dim=0).item())
            row["peak_share"] = row["tflops"] / peak["float32" if dtype == torch.float32 and not autocast
                                                     else "bfloat16"]
            print(f"{impl:22s} b{b:<3d} {s_img * 1e3:9.2f} ms/img  {row['images_per_s']:8.1f} img/s  "
                  f"max abs {row['max_abs']:.3g}  first call {warm[0] if warm else float('nan'):.1f} s", flush=True)
            del fwd, out, x
    if args.decoder_prompts > 0:
        for dt in (torch.float32, torch.bfloat16):
            try:
                record["decoder"] += [dict(r, dtype=str(dt).split(".")[1]) for r in
                                      bench_decoder(device, dt, args.decoder_prompts, args.warmup, args.repeats)]
            except Exception as e:
                record["decoder"].append({"impl": "decoder", "dtype": str(dt), "error": f"{type(e).__name__}: {e}"})
        for r in record["decoder"]:
            print(f"{r['impl']:22s} {r.get('dtype', '')} {r.get('prompts', '')} prompts: "
                  f"{r.get('ms_per_call', r.get('error'))}", flush=True)
    record["wall_s"] = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu_{cfg.name}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(record, args))
    print(f"wrote {stem}.json and {stem}.md ({record['wall_s']:.0f} s)")
    return 0


def markdown(record: Dict[str, Any], args: argparse.Namespace) -> str:
    """The record as a markdown report."""
    m, peak = record["machine"], record["matmul_peak_tflops"]
    lines = [f"# GPU encoder benchmark: {record['config']['name']}, {m['gpu']}"
             + (" (DRY RUN: tiny model on the CPU; no figure here means anything)" if record["dry_run"] else ""),
             "", f"torch {m['torch']} (CUDA {m['cuda']}), {m['date']}; bf16 matmul peak {peak['bfloat16']:.1f} "
             f"TFLOP/s, fp32 {peak['float32']:.1f} (TF32 off); {record['flops_per_image'] / 1e12:.3f} TFLOP/image; "
             f"median of {args.repeats} after {args.warmup} warm-up; command `{record['command']}`", "",
             "| implementation | batch | ms/image | images/s | peak GiB | TFLOP/s | % peak | max abs | mean abs | "
             "cosine | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if "s_per_image" not in r:
            lines.append(f"| {r['impl']} | {r['batch']} | {r['error']} | | | | | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"| {r['impl']} | {r['batch']} | {r['s_per_image'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                     f"{mem} | {r['tflops']:.2f} | {100 * r['peak_share']:.0f}% | {r['max_abs']:.2e} | "
                     f"{r['mean_abs']:.2e} | {r['cosine']:.6f} | {r['note']} |")
    if record["decoder"]:
        lines += ["", "Mask decoder (prompt encoder + mask decoder, random weights, one 64x64 embedding):", "",
                  "| decoder | dtype | prompts per call | ms per call | max abs vs eager |", "|---|---|---|---|---|"]
        for r in record["decoder"]:
            val = f"{r['ms_per_call']:.3f}" if "ms_per_call" in r else r["error"]
            mx = f"{r['max_abs_vs_eager']:.2e}" if "max_abs_vs_eager" in r else ""
            lines.append(f"| {r['impl']} | {r.get('dtype', '')} | {r.get('prompts', '')} | {val} | {mx} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
