"""int8 on CPU vs bfloat16: time per image and accuracy against float32, all in one process, interleaved.

Variants: samvit fp32 (the reference output), samvit bf16 (load_encoder(dtype=torch.bfloat16)), torch dynamic int8
(quantize_dynamic of every nn.Linear, qint8), onnxruntime fp32 (samvit export) and onnxruntime dynamic int8
(onnxruntime.quantization.quantize_dynamic of that file, MatMul with constant weights, i.e. the linear layers;
uint8 weights, and optionally ort_int8_s8 with int8 weights).
Rounds are interleaved (every variant once per round) so drifting load on a shared machine hits all alike.

    python benchmarks/bench_int8.py --model vit_b --threads 2 --rounds 3 --work /tmp/samvit_int8
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import resource
import statistics
import time
import warnings

import torch

import samvit
from samvit.export import compare, export_onnx, onnx_session


@torch.no_grad()
def random_weights_(encoder: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Nothing left at zero: position tables and rel-pos tables random, norm scales near 1 (linears keep init)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in encoder.named_parameters():
        if "pos" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "norm" in name or name.startswith("neck.1") or name.startswith("neck.3"):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return encoder


def input_image(cfg: samvit.EncoderConfig, image: str | None) -> torch.Tensor:
    """A real photo, preprocessed the official way (skimage's astronaut unless a file is given)."""
    if image is None:
        from skimage import data

        image = data.astronaut()
    x = samvit.preprocess(image).tensor[None]
    if cfg.img_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear")
    return x


def cpu_info() -> str:
    """CPU model and the instruction sets that decide bf16 and int8 speed (Linux only)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{model}, {os.cpu_count()} CPUs, " + " ".join(f"{f}:{'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--checkpoint", default=None, help="real weights (default: random weights, seed 0)")
    ap.add_argument("--image", default=None, help="input photo (default: skimage astronaut)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one untimed warm-up round")
    ap.add_argument("--work", default="/tmp/samvit_int8", help="folder for the checkpoint and ONNX files")
    ap.add_argument("--variants", default="fp32,bf16,torch_int8,ort_fp32,ort_int8",
                    help="any of fp32,bf16,torch_int8,fp32_ref (fp32, reference attention),ort_fp32,ort_int8,ort_int8_s8")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" advice
    torch.set_num_threads(args.threads)
    tuned = samvit.tune_allocator()
    os.makedirs(args.work, exist_ok=True)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(args.work, f"{args.model}_random.safetensors")
        samvit.save_encoder(random_weights_(samvit.load_encoder(args.model, dtype=torch.float32)), ckpt)
    fp32 = samvit.load_encoder(args.model, ckpt, dtype=torch.float32)
    x = input_image(fp32.config, args.image)
    names = args.variants.split(",")
    runners = {}
    if "fp32" in names:
        runners["fp32"] = lambda: fp32(x)  # the accuracy reference of every variant
    if "bf16" in names:
        bf16 = samvit.load_encoder(args.model, ckpt, dtype=torch.bfloat16)
        xb = x.to(torch.bfloat16)
        runners["bf16"] = lambda: bf16(xb)
    if "torch_int8" in names:
        from torch.ao.quantization import quantize_dynamic

        q8 = quantize_dynamic(samvit.load_encoder(args.model, ckpt, dtype=torch.float32), {torch.nn.Linear}, dtype=torch.qint8)
        crop = 2 * q8.config.patch_size * max(q8.config.window_size, 1)
        try:  # the fast path may assume float nn.Linear weights; the reference path takes any linear module
            with torch.no_grad():
                q8(x[..., :crop, :crop])
        except (AttributeError, RuntimeError) as e:
            print(f"torch_int8: fast attention path fails on quantized linears ({e}); using the reference path")
            q8.set_attention("reference")
            if "fp32_ref" not in names:
                names.insert(names.index("torch_int8") + 1, "fp32_ref")
        runners["torch_int8"] = lambda: q8(x)
    if "fp32_ref" in names:
        fp32_ref = samvit.load_encoder(args.model, ckpt, dtype=torch.float32, attn_impl="reference")
        runners["fp32_ref"] = lambda: fp32_ref(x)
    if any(n.startswith("ort_") for n in names):
        onnx32 = os.path.join(args.work, f"{args.model}.onnx")
        t = time.perf_counter()
        export_onnx(fp32, onnx32)
        print(f"export: {time.perf_counter() - t:.0f} s", flush=True)
        xn = x.numpy()
        if "ort_fp32" in names:
            s32 = onnx_session(onnx32, args.threads, arena=False)
            runners["ort_fp32"] = lambda: s32.run(None, {"image": xn})[0]
        from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

        # ort_int8: uint8 weights (what `samvit export onnx --int8` writes); ort_int8_s8: int8 weights, the
        # onnxruntime default, whose u8 x s8 products saturate int16 on CPUs without VNNI.
        for name, wtype in (("ort_int8", QuantType.QUInt8), ("ort_int8_s8", QuantType.QInt8)):
            if name in names:
                path = os.path.join(args.work, f"{args.model}_{name}.onnx")
                t = time.perf_counter()
                ort_quantize_dynamic(onnx32, path, weight_type=wtype, op_types_to_quantize=["MatMul", "Gemm"])
                print(f"{name}: onnxruntime quantize_dynamic {time.perf_counter() - t:.0f} s", flush=True)
                runners[name] = (lambda sess: lambda: sess.run(None, {"image": xn})[0])(
                    onnx_session(path, args.threads, arena=False))

    # Wall time, and the process's CPU time (all threads): on a shared machine the wall time swings with the
    # other load, the CPU time much less (it still counts worker threads' spin-waiting and suffers cache sharing).
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    outputs = {}
    with torch.no_grad():
        for r in range(args.rounds + 1):
            for k, fn in runners.items():
                gc.collect()
                t, c = time.perf_counter(), time.process_time()
                out = fn()
                dt, dc = time.perf_counter() - t, time.process_time() - c
                if r == 0:
                    outputs[k] = torch.as_tensor(out).float().numpy()
                else:
                    times[k].append(dt)
                    cpu[k].append(dc)
                print(f"round {r} {k}: {dt:.2f} s wall, {dc:.2f} s CPU{' (warm-up)' if r == 0 else ''}", flush=True)

    ref = outputs.get("fp32")
    try:
        from onnxruntime import __version__ as ort_version
    except ImportError:
        ort_version = "not installed"
    print(f"\n{time.strftime('%Y-%m-%d')}, {args.model}, {args.threads} threads, {cpu_info()}, torch {torch.__version__}, "
          f"onnxruntime {ort_version}, allocator tuned: {tuned}, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("| variant | wall s median | wall s, all | CPU s median | CPU s, all | CPU vs bf16 | CPU vs fp32 "
          "| max abs | mean abs | cosine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {b: statistics.median(cpu[b]) for b in ("bf16", "fp32") if b in cpu}
    for k, ts in times.items():
        c = statistics.median(cpu[k])
        acc = compare(outputs[k], ref) if ref is not None else {}
        rel = " | ".join(f"{base[b] / c:.2f}x" if b in base else "-" for b in ("bf16", "fp32"))
        print(f"| {k} | {statistics.median(ts):.2f} | {' '.join(f'{t:.1f}' for t in ts)} | {c:.2f} | "
              f"{' '.join(f'{t:.1f}' for t in cpu[k])} | {rel} | "
              + (f"{acc['max_abs']:.3g} | {acc['mean_abs']:.3g} | {acc['cosine']:.6f} |" if acc else "- | - | - |"))


if __name__ == "__main__":
    main()
