"""Side-by-side CPU benchmark of the SAM image encoder: samvit's paths against segment-anything, timm and
transformers on the same random weights, each in a fresh process (the same code as `samvit bench`).

    python benchmarks/bench_encoder.py                        # vit_b at 1024, fp32 + bf16, both allocators
    python benchmarks/bench_encoder.py --quick --impls samvit,official --dtypes float32
    python benchmarks/bench_encoder.py --batch-sizes 1,4 --impls samvit --allocators tuned

Writes benchmarks/results/encoder_<model>_<time>.{json,md}; `--help` lists every option.
"""
import sys

from samvit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
