"""Peak memory of training runs, the whole process tree counted (DataLoader workers and torchrun children
included): issue 21's memory table.

    python benchmarks/train_memory.py [--patch memeff] [--limit-gib G] --label NAME -- samvit train ARGS...
    python benchmarks/train_memory.py [--patch memeff] [--limit-gib G] --label NAME -- encoder-step vit_b 1024 1 fp32
    python benchmarks/train_memory.py [--patch memeff] --label NAME -- saved-for-backward vit_t 1024 2
    python benchmarks/train_memory.py --prepare FOLDER [N_PICTURES INSTANCES]   # inputs of the decoder-only rows

The command runs in a child process; every 0.2 s this process sums over the child and all its descendants
  - PSS (proportional set size, /proc/PID/smaps_rollup): shared pages split between the processes sharing them, so
    the sum is the memory the tree really holds (forked workers are counted for what they copied, not twice);
  - RSS: resident pages of each process, shared pages counted in every process that maps them (an upper bound);
and reports the peaks, with the child's own peak RSS (ru_maxrss). `--limit-gib` caps the child's address space
(RLIMIT_DATA) so that a run that would not fit fails instead of pressing a shared machine.

`--patch memeff` registers samvit.modeling.attention_memeff.memeff_attention as the attention of the `auto` and
`sdpa_chunked` kernels under autograd (in the child only; the library is not changed): what the integrator will
wire into the kernel registry. `encoder-step PRESET SIZE BATCH PRECISION [ckpt]` is one training step of a SAM
image encoder with random weights (forward, mean-square of the embedding as the loss, backward, AdamW step), as
benchmarks/bench_train.py's sam_vit_b row.

Results are appended to benchmarks/results/train_memory.jsonl (command, machine, date, peaks).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "train_memory.jsonl")


def patch_memeff() -> None:
    """Route the training path's attention (autograd on, no inference workspace) through memeff_attention."""
    import torch

    from samvit.modeling import attention as A
    from samvit.modeling.attention_memeff import memeff_attention

    originals = {name: A.KERNELS[name] for name in ("auto", "sdpa_chunked")}

    def make(orig):
        def kernel(attn, qkv, hw, out=None, workspace=None):
            if workspace is not None or not torch.is_grad_enabled():
                return orig.fn(attn, qkv, hw, out=out, workspace=workspace)
            B, N = qkv.shape[:2]
            nh, hd = attn.num_heads, attn.head_dim
            q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * nh, N, hd).unbind(0)
            rel_h = rel_w = None
            if attn.use_rel_pos:
                H, W = hw
                rel_h, rel_w = A.rel_pos_terms(q.float(), attn.rel_pos_h, attn.rel_pos_w, hw)
                rel_h, rel_w = rel_h.reshape(B * nh, N, H), rel_w.reshape(B * nh, N, W)
            o = memeff_attention(q, k, v, rel_h, rel_w, attn.scale, hw)
            o = o.view(B, nh, N, hd).permute(0, 2, 1, 3).reshape(B, N, nh * hd)
            return o if out is None else out.copy_(o)
        return kernel

    for name, orig in originals.items():
        A.KERNELS[name] = A.Kernel(name, make(orig), orig.official, takes_out=True)


def encoder_step(preset_name: str, size: int, batch: int, precision: str, ckpt: bool = False) -> None:
    import torch

    from samvit.config import preset
    from samvit.modeling.encoder import ImageEncoder
    from samvit.runtime import tune_allocator
    from samvit.train.launch import autocast
    from samvit.train.optim import build_optimizer

    tune_allocator()
    torch.manual_seed(0)
    import dataclasses

    cfg = dataclasses.replace(preset(preset_name), img_size=size)
    model = ImageEncoder(cfg).train()
    if ckpt:
        model.set_grad_checkpointing(True)
    opt = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95))
    x = torch.randn(batch, 3, size, size)
    t = time.perf_counter()
    with autocast(torch.device("cpu"), precision):
        y = model(x)
    loss = y.float().pow(2).mean()
    loss.backward()
    opt.step()
    print(f"encoder-step: loss {loss.item():.4f}, {time.perf_counter() - t:.1f} s")


def prepare(folder: str, n: int = 8, instances: int = 8) -> None:
    """FOLDER/sam_vit_b_random.pth (SAM ViT-B, random weights, official layout) and FOLDER/data (a mask folder of n
    320x240 pictures with `instances` non-overlapping rectangles each), the inputs of the decoder-only rows."""
    import numpy as np
    import torch
    from PIL import Image

    from samvit.config import DecoderConfig, preset
    from samvit.modeling.encoder import ImageEncoder
    from samvit.modeling.sam import Sam, SamDecoder

    os.makedirs(os.path.join(folder, "data", "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "data", "masks"), exist_ok=True)
    ck = os.path.join(folder, "sam_vit_b_random.pth")
    if not os.path.exists(ck):
        torch.manual_seed(0)
        torch.save(Sam(ImageEncoder(preset("vit_b")), SamDecoder(DecoderConfig())).state_dict(), ck)
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb = rng.integers(0, 60, (240, 320, 3), dtype=np.uint8)
        labels = np.zeros((240, 320), np.uint8)
        for j in range(instances):  # a 4 x 2 grid of cells, one rectangle in each
            r, c = divmod(j, 4)
            y0, x0 = r * 120 + rng.integers(5, 30), c * 80 + rng.integers(5, 20)
            y1, x1 = y0 + rng.integers(40, 85), x0 + rng.integers(30, 55)
            labels[y0:y1, x0:x1] = j + 1
            rgb[y0:y1, x0:x1] = rng.integers(80, 255, 3)
        Image.fromarray(rgb).save(os.path.join(folder, "data", "images", f"pic_{i:03d}.png"))
        Image.fromarray(labels).save(os.path.join(folder, "data", "masks", f"pic_{i:03d}.png"))
    print(f"prepared {folder}: {ck}, {n} pictures x {instances} instances")


def saved_for_backward(preset_name: str, size: int, batch: int) -> None:
    """The tensors one training forward of an encoder keeps for backward (parameters excluded), by shape: where a
    training step's memory goes. Counted by a saved-tensors hook in a forward that is never backpropagated."""
    import collections
    import dataclasses

    import torch

    from samvit.config import preset
    from samvit.modeling.encoder import ImageEncoder

    torch.manual_seed(0)
    model = ImageEncoder(dataclasses.replace(preset(preset_name), img_size=size)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, by_shape = {}, collections.Counter()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in kept:
            kept[st.data_ptr()] = st
            by_shape[tuple(t.shape)] += st.nbytes()
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        model(torch.randn(batch, 3, size, size))
    total = sum(st.nbytes() for st in kept.values()) / 2 ** 20
    print(f"saved for backward: {total:.0f} MiB in {len(kept)} storages; largest by shape:")
    for shape, n in by_shape.most_common(6):
        print(f"  {shape}: {n / 2 ** 20:.0f} MiB")


def child(argv) -> None:
    if argv and argv[0] == "--patch":
        if argv[1] != "memeff":
            raise SystemExit(f"unknown --patch {argv[1]}")
        patch_memeff()
        argv = argv[2:]
    if argv[0] == "saved-for-backward":
        saved_for_backward(argv[1], int(argv[2]), int(argv[3]))
        return
    if argv[0] == "encoder-step":
        a = argv[1:]
        encoder_step(a[0], int(a[1]), int(a[2]), a[3], len(a) > 4 and a[4] == "ckpt")
        return
    if argv[0] == "samvit":
        argv = argv[1:]
    from samvit.cli import main

    raise SystemExit(main(argv))


def _tree(root: int):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _mem(pid: int):
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def machine() -> str:
    try:
        sys.path.insert(0, os.path.join(HERE, "..", "src"))
        from samvit.bench.runner import machine_info

        return json.dumps(machine_info())
    except Exception as e:  # the line is informative only
        return f"unknown ({e})"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", choices=("memeff",), default=None)
    p.add_argument("--limit-gib", type=float, default=10.0)
    p.add_argument("--label", required=True)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    argv = [sys.executable, os.path.abspath(__file__), "--child"] + (["--patch", args.patch] if args.patch else []) + cmd
    limit = int(args.limit_gib * 2 ** 30)

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    start = time.time()
    proc = subprocess.Popen(argv, preexec_fn=cap)
    peak_pss = peak_rss = peak_n = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        mems = [_mem(q) for q in pids]
        pss, rss = sum(m[0] for m in mems), sum(m[1] for m in mems)
        if pss > peak_pss:
            peak_pss, peak_n = pss, len([m for m in mems if m[1]])
        peak_rss = max(peak_rss, rss)
        time.sleep(0.2)
    child_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rec = {"label": args.label, "command": " ".join(["python benchmarks/train_memory.py"] +
                                                   (["--patch", args.patch] if args.patch else []) + ["--"] + cmd),
           "rc": proc.returncode, "peak_tree_pss_mib": round(peak_pss / 1024), "peak_tree_rss_mib":
           round(peak_rss / 1024), "processes_at_peak": peak_n, "main_peak_rss_mib": round(child_max / 1024),
           "wall_s": round(time.time() - start, 1), "limit_gib": args.limit_gib,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    print(json.dumps(rec))
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
