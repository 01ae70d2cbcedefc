"""The side-by-side encoder benchmark (`samvit bench`, benchmarks/bench_encoder.py): a tool, not imported by the
library. peers (the implementations) <- worker (one run in a fresh process) <- runner (the plan and the record)
-> report (markdown and JSON); weights (random SAM weights) and peak (the matmul peak) are shared with
benchmarks/ and the tests."""
