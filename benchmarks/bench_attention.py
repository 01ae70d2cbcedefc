"""One global ViT-B attention (12 heads, 64x64 = 4096 tokens, head dim 64, decomposed relative-position bias),
every candidate kernel side by side, interleaved with the matmul peak in one process.

    python benchmarks/bench_attention.py --threads 2 --dtypes float32,bfloat16 --rounds 3 --out benchmarks/results

Candidates: samvit's registered kernels (sdpa_chunked, matmul_blocked) with and without a workspace; the former
chunking (8 Mi-entry bias chunks allocated per chunk); SDPA without any bias (the floor for a fused kernel); the
bias folded into augmented q/k (q' = [q*scale, rel_h, rel_w], k' = [k, onehot(row), onehot(col)]) so that SDPA
runs without a mask (v of head dim 64, and v zero-padded to q's 192); FlexAttention with a score_mod (compiled);
with --chunk-elems, matmul_blocked under other chunk budgets (L2-sized chunks against the default);
the official arithmetic (full scores). Each is timed on the same q, k, v; errors are against the official
arithmetic in float32.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from samvit.bench.runner import machine_info
from samvit.modeling import attention as A
from samvit.modeling import kernels as K
from samvit.modeling.bias_softmax import bias_softmax
from samvit.modeling.workspace import Workspace

B, NH, H, W, HD = 1, 12, 64, 64, 64
N = H * W
FLOPS = 4 * N * N * HD * NH  # q.k and p.v, 51.5 GFLOP


def setup(dtype):
    g = torch.Generator().manual_seed(0)
    attn = A.Attention(NH * HD, NH, use_rel_pos=True, input_size=(H, W)).eval()
    with torch.no_grad():
        attn.rel_pos_h.copy_(0.1 * torch.randn(attn.rel_pos_h.shape, generator=g))
        attn.rel_pos_w.copy_(0.1 * torch.randn(attn.rel_pos_w.shape, generator=g))
    qkv = torch.randn(B, N, 3, NH, HD, generator=g).to(dtype)
    return attn, qkv


def _inputs(attn, qkv) -> K.AttnInputs:
    return A.attention_inputs(qkv.reshape(B, N, -1), (H, W), NH, attn.scale, (attn.rel_pos_h, attn.rel_pos_w))


def candidates(attn, qkv, dtype, flex: bool, chunk_elems=()):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_h, rel_w = A.rel_pos_terms(q.float(), attn.rel_pos_h, attn.rel_pos_w, (H, W))  # (B,nh,H,W,H), (..,W)
    ws = Workspace()
    out = torch.empty(B, N, NH * HD, dtype=dtype)

    inp = _inputs(attn, qkv)  # the kernels' record (head-major q, k, v copies; the two bias terms)

    def kernel(name, workspace):
        kern = K.KERNELS[name]
        return lambda: kern(inp, out=out, workspace=ws if workspace else None)

    def chunked(elems: int):  # matmul_blocked with another chunk budget (and min queries scaled with it)
        def run():
            saved = K.MASK_CHUNK_ELEMS, K.MIN_CHUNK_QUERIES
            K.MASK_CHUNK_ELEMS, K.MIN_CHUNK_QUERIES = elems, max(1, min(saved[1], elems // N))
            try:
                return K.KERNELS["matmul_blocked"](inp, out=out, workspace=ws)
            finally:
                K.MASK_CHUNK_ELEMS, K.MIN_CHUNK_QUERIES = saved
        return run

    def former():  # the chunking before round 2: 8 Mi-entry chunks, each bias chunk a fresh tensor
        saved = K.MASK_CHUNK_ELEMS
        K.MASK_CHUNK_ELEMS = 1 << 23
        try:
            return K.KERNELS["sdpa_chunked"](inp)
        finally:
            K.MASK_CHUNK_ELEMS = saved

    def fused(compiled: bool):  # the blocked kernel with bias + softmax in one pass (bias_softmax) after a plain GEMM
        def run():
            Hk, Wk = inp.key_hw
            rh, rw = inp.rel_h.view(B, NH, N, Hk), inp.rel_w.view(B, NH, N, Wk)
            o4 = out.view(B, N, NH, HD)
            for b0, b1, h0, h1, i0, i1 in K._chunks(B, NH, N, N, q.device):
                g, nq = (b1 - b0) * (h1 - h0), i1 - i0
                qc = inp.q.view(B, NH, N, HD)[b0:b1, h0:h1, i0:i1].reshape(g, nq, HD)
                kt = inp.k.view(B, NH, N, HD)[b0:b1, h0:h1].reshape(g, N, HD).transpose(1, 2)
                vc = inp.v.view(B, NH, N, HD)[b0:b1, h0:h1].reshape(g, N, HD)
                scores = ws.get("f_scores", (g, nq, N), dtype, q.device)
                probs = ws.get("f_probs", (g, nq, N), dtype, q.device)
                torch.bmm(qc, kt, out=scores)
                bias_softmax(scores, rh[b0:b1, h0:h1, i0:i1].reshape(g, nq, Hk),
                             rw[b0:b1, h0:h1, i0:i1].reshape(g, nq, Wk), inp.scale, out=probs, compiled=compiled)
                o = torch.bmm(probs, vc, out=ws.get("f_out", (g, nq, HD), dtype, q.device))
                o4[b0:b1, i0:i1, h0:h1].copy_(o.view(b1 - b0, h1 - h0, nq, HD).transpose(1, 2))
            return out
        return run

    onehot = torch.zeros(N, H + W, dtype=dtype)
    idx = torch.arange(N)
    onehot[idx, idx // W] = 1
    onehot[idx, H + idx % W] = 1

    def folded(pad_v: bool):
        def run():
            qf = torch.cat([q * attn.scale, rel_h.flatten(2, 3).to(dtype), rel_w.flatten(2, 3).to(dtype)], -1)
            kf = torch.cat([k, onehot.expand(B, NH, N, H + W)], -1)
            vf = torch.cat([v, v.new_zeros(B, NH, N, H + W)], -1) if pad_v else v
            return F.scaled_dot_product_attention(qf, kf, vf, scale=1.0)[..., :HD].transpose(1, 2)
        return run

    cands = {
        "sdpa_chunked (workspace)": kernel("sdpa_chunked", True),
        "sdpa_chunked (no workspace)": kernel("sdpa_chunked", False),
        "former sdpa_chunked (8 Mi chunks)": former,
        "matmul_blocked (workspace)": kernel("matmul_blocked", True),
        "matmul_blocked (no workspace)": kernel("matmul_blocked", False),
        "blocked, bias + softmax fused (bias_softmax, inductor)": fused(True),
        "SDPA, no bias (floor, wrong result)": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2),
        "folded bias into q/k, v head dim 64": folded(False),
        "folded bias into q/k, v padded to 192": folded(True),
        "official arithmetic (full scores)": lambda: K.KERNELS["reference"](inp),
    }
    for elems in chunk_elems:
        cands[f"matmul_blocked (workspace), chunks of {elems // N} queries ({elems / 2 ** 20:g} Mi entries)"] = \
            chunked(elems)
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        rh = rel_h.flatten(2, 3).to(dtype).contiguous()  # (B, nh, N, H)
        rw = rel_w.flatten(2, 3).to(dtype).contiguous()  # (B, nh, N, W)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rh[b, h, q_idx, kv_idx // W] + rw[b, h, q_idx, kv_idx % W]

        compiled = torch.compile(flex_attention, dynamic=False)
        cands["FlexAttention + score_mod (compiled)"] = lambda: compiled(q, k, v, score_mod=score_mod).transpose(1, 2)
    return cands


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a minute)")
    p.add_argument("--chunk-elems", default="", help="also matmul_blocked with these chunk budgets (entries, "
                   "comma-separated; the default is %d)" % K.MASK_CHUNK_ELEMS)
    p.add_argument("--out", default=None, help="folder for attention_<time>.json/.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = {"machine": machine_info(), "command": "python " + " ".join(sys.argv), "threads": args.threads,
              "rounds": args.rounds, "flops": FLOPS, "results": {}}
    ref = None
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        attn, qkv = setup(dtype)
        if ref is None:
            ref = K.KERNELS["reference"](_inputs(attn, setup(torch.float32)[1])).float()
        a, b = (torch.randn(4096, 4096, dtype=dtype) for _ in range(2))
        cands = candidates(attn, qkv, dtype, not args.no_flex,
                           [int(e) for e in args.chunk_elems.split(",") if e.strip()])
        times = {name: [] for name in cands}
        peaks, errs = [], {}
        with torch.inference_mode():
            for name, fn in cands.items():  # warm-up (and compile), errors
                try:
                    out = fn().reshape(B, N, NH * HD).float()
                    errs[name] = (out - ref).abs().max().item() if "floor" not in name else None
                except Exception as e:  # a candidate that cannot run here is recorded, not fatal
                    errs[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            for rnd in range(args.rounds):
                peaks.append(2 * 4096 ** 3 / min(timed(lambda: a @ b)[0] for _ in range(2)) / 1e9)
                for name, fn in cands.items():
                    if isinstance(errs[name], str):
                        continue
                    times[name].append(timed(fn)[0])
                    print(f"{dname} round {rnd} {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
            peaks.append(2 * 4096 ** 3 / min(timed(lambda: a @ b)[0] for _ in range(2)) / 1e9)
        peak = max(peaks)
        rows = {}
        for name in cands:
            if not times[name]:
                rows[name] = {"error": errs[name]}
                continue
            s = statistics.median(times[name])
            rows[name] = {"s": s, "times": times[name], "gflops": FLOPS / s / 1e9, "peak_share": FLOPS / s / 1e9 / peak,
                          "max_abs_vs_official_fp32": errs[name]}
        record["results"][dname] = {"matmul_peak_gflops": peak, "peaks": peaks, "rows": rows}
    record["load_average_end"] = list(os.getloadavg())
    md = markdown(record)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "attention_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"wrote {stem}.json and {stem}.md")
    return 0


def markdown(record) -> str:
    m = record["machine"]
    lines = ["# One global ViT-B attention (12 heads, 4096 tokens, head dim 64, rel-pos bias)", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, instruction sets: {m['isa_flags']}; torch {m['torch']}; "
             f"{m['date']}",
             f"- load average at start {', '.join(f'{v:.2f}' for v in m['load_average'])}, at end "
             f"{', '.join(f'{v:.2f}' for v in record['load_average_end'])}",
             f"- {record['threads']} threads; {record['rounds']} interleaved rounds after a warm-up, median; "
             f"{record['flops'] / 1e9:.1f} GFLOP (q.k and p.v); share = GFLOP/s / the best in-run 4096^3 matmul",
             f"- command: `{record['command']}`", ""]
    for dname, res in record["results"].items():
        lines += [f"## {dname} (matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s; per round "
                  f"{', '.join(f'{p:.0f}' for p in res['peaks'])})", "",
                  "| candidate | s | GFLOP/s | share of matmul peak | max abs vs official fp32 |", "|---|---|---|---|---|"]
        for name, r in res["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | |")
                continue
            e = r["max_abs_vs_official_fp32"]
            lines.append(f"| {name} | {r['s']:.3f} | {r['gflops']:.1f} | {r['peak_share']:.2f} | "
                         f"{'-' if e is None else f'{e:.1e}'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
