#!/usr/bin/env bash
# The speed measurements of issue 14 in one go, one after another on a quiet machine (ViT-B, 2 threads):
#   bash benchmarks/speed_round2.sh            # writes benchmarks/results/{attention,encoder}_*.{json,md}, int8.md
# 1. every attention kernel on one global ViT-B attention, interleaved with the matmul peak;
# 2. the whole encoder, fp32 at 1024: samvit (plain library use: load_encoder, no allocator tuning) under glibc's
#    default allocator and tuned, its blocked kernel, and the peers, interleaved over 2 rounds; torch.compile;
# 3. bfloat16 (what dtype="auto" picks on a CPU with AVX512-BF16 or AMX) against the peers' autocast;
# 4. time per image against input size (512, 768, 1280; 1024 is in 2.);
# 5. int8 (signed int8 weights in onnxruntime) against float32 and bfloat16.
set -uo pipefail  # one failing step does not stop the others
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
$PY benchmarks/bench_attention.py --threads 2 --dtypes float32,bfloat16 --rounds 3 --out $OUT
$PY -m samvit bench --impls samvit,samvit-blocked,official,timm,transformers,onnxruntime,openvino \
    --dtypes float32 --allocators default,tuned --rounds 2 --repeats 2 --out $OUT --quiet
$PY -m samvit bench --impls samvit-compiled --dtypes float32 --allocators default --repeats 2 --out $OUT --quiet
$PY -m samvit bench --impls samvit,official,transformers --dtypes bfloat16 --allocators default,tuned \
    --repeats 2 --out $OUT --quiet
for size in 512 768 1280; do
    $PY -m samvit bench --impls samvit --img-size $size --dtypes float32,bfloat16 --allocators default \
        --repeats 3 --out $OUT --quiet
done
$PY benchmarks/bench_int8.py --model vit_b --threads 2 --rounds 3 \
    --variants fp32,bf16,torch_int8,ort_fp32,ort_int8,ort_int8_s8 --work /tmp/samvit_int8 | tee $OUT/int8_run.txt
