"""A tiny smoke run of the benchmark code path (subprocess workers, error metrics, files); no timing asserts."""
import json

import pytest

import samvit
from samvit.bench import report, runner
from samvit.cli import main as cli_main

TINY = samvit.EncoderConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                            out_chans=16, name="tiny")


def test_plan_runs_every_allocator_and_only_supported_precisions():
    """samvit runs under both allocator settings like its peers (it no longer tunes its own process)."""
    runs = runner.plan_runs(["samvit", "samvit-reference", "official"], ["float32", "bfloat16"], [1, 2],
                           ["default", "tuned"])
    keys = {(r["impl"], r["dtype"], r["batch"], r["allocator"]) for r in runs}
    assert ("samvit", "bfloat16", 2, "default") in keys and ("official", "bfloat16", 1, "tuned") in keys
    assert ("samvit", "float32", 1, "tuned") in keys
    assert not any(r["impl"] == "samvit-reference" and r["dtype"] == "bfloat16" for r in runs)
    assert len(runs) == 2 * (2 * 2 + 2 * 1 + 2 * 2)


def test_smoke_run_against_official(tmp_path):
    rec = runner.run_benchmark(TINY, impls=["samvit", "official"], dtypes=["float32"], batch_sizes=[2],
                              allocators=["tuned"], threads=1, warmup=1, repeats=1, timeout=600,
                              peak_size=256, progress=False, label="test", rounds=2)
    assert rec["reference_impl"] == "official"
    assert rec["flops_per_image"] > 0 and rec["matmul_peak"]["float32"]["gflops"] > 0
    rows = {(r["impl"], r["batch"], r["allocator"]): r for r in rec["runs"]}
    assert set(rows) == {("samvit", 2, "tuned"), ("official", 2, "tuned")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["s_per_image"] > 0 and r["peak_rss_mib"] > 0 and r["gflops"] > 0 and 0 < r["peak_share"]
        assert r["max_abs"] <= 1e-5 and r["cosine"] > 0.99999
        assert r["out_shape"] == [r["batch"], 16, 4, 4]
        assert len(r["times_s"]) == 2 and r["isa"] == rec["machine"]["isa_flags"]  # one timed run per round
    assert rows[("official", 2, "tuned")]["max_abs"] == 0.0  # the yardstick itself
    js, md = report.write_results(rec, str(tmp_path))
    assert json.load(open(js))["runs"] == rec["runs"]
    text = open(md).read()
    assert "samvit fast path (default kernel: auto)" in text and "official segment-anything" in text and "**test**" in text
    assert "ISA flags beside every row" in text and set(rec["machine"]["isa"]) == {
        "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx"}


def test_reference_made_without_the_official_run(tmp_path):
    """With the official run filtered out, an untimed run still makes the yardstick output."""
    rec = runner.run_benchmark(TINY, impls=["samvit-reference"], dtypes=["float32"], allocators=["tuned"],
                              threads=1, warmup=0, repeats=1, timeout=600, peak_size=None, progress=False)
    assert rec["reference_impl"] == "official"
    (row,) = rec["runs"]
    assert row["max_abs"] == 0.0  # the reference path is the official arithmetic, bit for bit
    assert "not measured" in report.markdown(rec)


@pytest.mark.parametrize("argv,message", [(["--impls", "samvit,mxnet"], "unknown implementation 'mxnet'"),
                                          (["--dtypes", "int8"], "unknown dtype 'int8'"),
                                          (["--allocators", "jemalloc"], "unknown allocator setting"),
                                          (["--batch-sizes", "0"], "at least 1")])
def test_cli_refuses_bad_options(argv, message, capsys):
    assert cli_main(["bench", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def _bench_gpu():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_without_cuda_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _bench_gpu().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_bench_sam_fast_attention_equals_official():
    """The segment-anything-fast configuration's attention (SDPA + summed bias) computes the official function."""
    import torch

    from samvit.bench.peers import official_encoder
    from samvit.bench.weights import random_weights

    sd = random_weights(TINY)
    official = official_encoder(TINY)
    official.load_state_dict(sd)
    fast, _ = _bench_gpu()._sam_fast_encoder(TINY)
    fast.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert (official.eval()(x) - fast.eval()(x)).abs().max() <= 1e-5


def test_gpu_bench_dry_run_on_cpu(tmp_path, monkeypatch):
    """`bench_gpu.py --dry-run`: every implementation (compile aside) and the decoder run on a tiny model on the
    CPU and write the report, so that the script is checked before a GPU is lent."""
    from samvit.modeling import attention

    monkeypatch.setattr(attention, "KERNELS", dict(attention.KERNELS))  # the script may register "flex": undone
    assert _bench_gpu().main(["--dry-run", "--no-compile", "--decoder-prompts", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("gpu_tiny_*.json")
    rec = json.load(open(js))
    rows = {(r["impl"], r["batch"]): r for r in rec["runs"]}
    assert {i for i, _ in rows} == {"samvit-sdpa", "samvit-flex", "official", "official-bf16"}
    assert rows[("official", 1)]["max_abs"] == 0.0 and "skipped" in rows[("official", 8)]["error"]
    for key in [("samvit-sdpa", 1), ("samvit-flex", 8), ("official-bf16", 8)]:
        assert "error" not in rows[key], rows[key]
        assert rows[key]["cosine"] > 0.9999 and rows[key]["s_per_image"] > 0
    assert rows[("samvit-flex", 1)]["note"] == "kernel flex"
    dec = {(r["impl"], r["dtype"]): r for r in rec["decoder"]}
    assert dec[("decoder, eager", "float32")]["ms_per_call"] > 0
    assert "no CUDA" in dec[("decoder, CUDA graph", "bfloat16")]["error"]
    assert "DRY RUN" in open(str(js)[:-4] + "md").read()


def test_speed_table_from_recorded_runs():
    """benchmarks/speed_table.py builds README's table from the 2026-11-29 records (the figures README shows)."""
    import importlib.util
    import os

    root = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    spec = importlib.util.spec_from_file_location("speed_table", os.path.join(root, "speed_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fp32, bf16 = (os.path.join(root, "results", f"encoder_vit_b_20261129-{t}.json") for t in ("050312", "050527"))
    text = module.table(json.load(open(fp32)), json.load(open(bf16)), fp32, bf16)
    assert "| **samvit** | 6.23 | 82% | 1287 |" in text and "| 3.45 | 74% | 0.999976 |" in text
    assert "official segment-anything | 11.98 | 42%" in text and "1.92x in float32, 1.85x in bfloat16" in text
    assert "avx512_bf16" in text and "2026-11-29" in text
