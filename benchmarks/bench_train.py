"""What the training options cost: step time and peak memory of one training step, with and without activation
checkpointing, in fp32 and bf16 autocast.

    python benchmarks/bench_train.py --out benchmarks/results/train_cpu.md

Rows:
- mae_vit_b: MAE ViT-B at 224/16 (mask 75%, decoder 512x8), batch --mae-batch, forward + backward + AdamW step
  through samvit.train's own pieces (build_optimizer, autocast, the MAE loss);
- sam_vit_b: the SAM ViT-B ImageEncoder at 1024, batch 1, forward + backward (mean-square of the embedding as the
  loss) + AdamW step. Its activation checkpointing needs ImageEncoder.set_grad_checkpointing; where this checkout's
  encoder lacks it, the checkpointing rows are skipped with a message.

Each configuration runs in a fresh subprocess (so peak RSS is its own): --warmup steps, then --steps timed steps;
reported: median wall seconds per step, process CPU seconds per step, peak RSS of the process and its growth
over the RSS before the first step (CPU), or peak CUDA memory allocated (GPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROWS = ("mae_vit_b", "sam_vit_b")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def saved_for_backward(model, loss_fn, device, precision: str) -> tuple:
    """(MiB of the distinct tensors autograd keeps for the backward pass of one forward, parameters excluded;
    seconds of that forward), counted by a saved-tensors hook in a forward that is never backpropagated: the memory
    of the saved set (held until the count is done, so no address is reused), not the backward's transients."""
    import torch

    from samvit.train.launch import autocast

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st  # held: a freed storage's address could be reused and counted once for two
        return None  # the graph keeps nothing: this pass is never backpropagated

    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), autocast(device, precision):
        loss_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return sum(st.nbytes() for st in kept.values()) / 2 ** 20, seconds


def worker(spec: dict) -> dict:
    """One configuration, in this process: build, warm up, time the steps."""
    import torch

    from samvit.runtime import tune_allocator
    from samvit.train.launch import autocast, check_precision
    from samvit.train.optim import build_optimizer

    if spec["mem_limit_gib"]:  # a shared machine: fail this configuration rather than the neighbours' jobs
        limit = int(spec["mem_limit_gib"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    tune_allocator()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if spec["row"] == "mae_vit_b":
        from samvit.config import mae_preset
        from samvit.modeling.mae import MaskedAutoencoder

        model = MaskedAutoencoder(mae_preset("mae_vit_b")).to(device)
        x = torch.randn(spec["mae_batch"], 3, 224, 224, device=device)
        noise = torch.rand(spec["mae_batch"], model.config.num_patches, device=device)  # the same masks every step

        def loss_fn():
            return model(x, noise=noise)[0]
    else:
        from samvit.config import preset
        from samvit.modeling.encoder import ImageEncoder

        model = ImageEncoder(preset("vit_b")).to(device)
        x = torch.randn(1, 3, 1024, 1024, device=device)

        def loss_fn():
            return model(x).float().pow(2).mean()
    if spec["checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            return {"skipped": f"{type(model).__name__} has no set_grad_checkpointing() in this checkout"}
        model.set_grad_checkpointing(True)
    check_precision(spec["precision"], getattr(model, "config", None))
    model.train()
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if spec["mode"] == "saved":
        out["saved_mib"], out["forward_s"] = saved_for_backward(model, loss_fn, device, spec["precision"])
        return out
    opt = build_optimizer(model, 1e-4)
    times, cpu = [], []
    rss_before = _rss_mib()
    try:
        for i in range(spec["warmup"] + spec["steps"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            with autocast(device, spec["precision"]):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    except (RuntimeError, MemoryError) as e:
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out["skipped"] = f"the step needs more than this run's {spec['mem_limit_gib']:g} GiB limit (out of memory)"
        return out
    out.update(step_s=statistics.median(times), cpu_s=statistics.median(cpu), loss=float(loss))
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["growth_mib"] = out["peak_mib"] - rss_before
    return out


def run_worker(spec: dict) -> dict:
    """One configuration in a fresh process (its own peak RSS)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    last = (proc.stderr.strip().splitlines() or [""])[-1][:200].replace("|", "/")
    return json.loads(lines[-1][7:]) if lines else {"skipped": f"failed (exit {proc.returncode}): {last}"}


def machine() -> str:
    """CPU model, instruction-set flags that matter here, cores; GPU name if any."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    have = [f for f in wanted if f in flags]
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model} ({platform.machine()}), {os.cpu_count()} CPUs, flags: {' '.join(have) or 'none of '}"
            f"{'' if have else ', '.join(wanted)}{gpu}, torch {torch.__version__}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--mae-batch", type=int, default=8, help="MAE ViT-B batch (default 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--mem-limit-gib", type=float, default=10.0, help="RLIMIT_DATA of each configuration's "
                   "process (default 10; 0 = none): a configuration that needs more is reported, not run")
    p.add_argument("--out", default=None, help="write the markdown table here (and print it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for row in args.rows.split(","):
        for precision in args.precisions.split(","):
            for ckpt in (False, True):
                spec = {"row": row, "precision": precision, "checkpointing": ckpt, "threads": args.threads,
                        "device": args.device, "warmup": args.warmup, "steps": args.steps,
                        "mae_batch": args.mae_batch, "mem_limit_gib": args.mem_limit_gib, "mode": "step"}
                res = run_worker(spec)
                if not ckpt and "params_m" in res:  # inside checkpointed blocks checkpoint's own hooks take over
                    saved = run_worker(dict(spec, mode="saved"))
                    res.update({k: saved[k] for k in ("saved_mib", "forward_s") if k in saved})
                    if "skipped" in saved:
                        oom = "out of memory" if "allocate memory" in saved["skipped"] else saved["skipped"]
                        res["skipped"] = "; ".join(filter(None, [res.get("skipped"), "the saved-for-backward "
                                                                 f"forward alone: {oom}"]))
                rows.append((spec, res))
                print(row, precision, "ckpt" if ckpt else "no-ckpt", res, file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    ended = datetime.datetime.now(datetime.timezone.utc)

    cmd = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    out = ["# Training step: activation checkpointing and precision", "",
           f"Command: `{cmd}`  ",
           f"Machine: {machine()}  ",
           f"Date: {started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC; device {args.device}, {args.threads} threads; "
           f"warmup {args.warmup} step(s), median of {args.steps} timed step(s).  ",
           f"The machine was shared with other engineers' jobs (1-minute load average {load_before[0]:.1f} before, "
           f"{load_after[0]:.1f} after, on {os.cpu_count()} CPUs): wall times are inflated by an unknown factor; "
           "process CPU seconds and the ratios between rows of one run are the steadier numbers.", "",
           "| model | input | precision | act. checkpointing | s/step (wall) | CPU s/step | peak "
           f"{'CUDA alloc' if args.device.startswith('cuda') else 'RSS'} MiB | growth MiB | of which weights' "
           "grads + AdamW moments MiB | saved for backward MiB | forward alone s (wall) | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, res in rows:
        inp = f"224, batch {args.mae_batch}" if spec["row"] == "mae_vit_b" else "1024, batch 1"
        head = f"| {spec['row']} | {inp} | {spec['precision']} | {'yes' if spec['checkpointing'] else 'no'} |"
        saved = f"{res['saved_mib']:.0f} | {res['forward_s']:.2f}" if "saved_mib" in res else "- | -"
        fixed = f"{3 * 4 * res['params_m'] * 1e6 / 2 ** 20:.0f}" if "params_m" in res else "-"
        if "step_s" not in res:
            out.append(f"{head} - | - | - | - | {fixed} | {saved} | {res.get('skipped', '')} |")
        else:
            out.append(f"{head} {res['step_s']:.2f} | {res['cpu_s']:.2f} | {res['peak_mib']:.0f} | "
                       f"{res.get('growth_mib', float('nan')):.0f} | {fixed} | {saved} | |")
    out += ["", "Step = forward + backward + AdamW step (the first, warm-up step allocates the AdamW state). Growth = "
            "peak RSS minus the RSS before the first step (model built, inputs made): activations + gradients + "
            "AdamW moments; the next column is the part that does not depend on checkpointing or precision (3 x 4 "
            "bytes per parameter), the rest is activation memory and allocator slack. samvit's allocator setting "
            "(tune_allocator: freed memory is kept for reuse) is on, as in `samvit train`. Saved for backward = "
            "the distinct tensors autograd keeps from one forward pass (parameters excluded), counted with "
            "torch.autograd.graph.saved_tensors_hooks in a forward of its own (another fresh process) that is never "
            "backpropagated, so it is known even where the real step does not fit; it excludes the backward's "
            "transients; not shown with checkpointing (its own hooks take over inside the blocks). Forward alone = "
            "that forward's wall time."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
