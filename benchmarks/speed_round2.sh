#!/usr/bin/env bash
# The speed measurements of issue 14, one after another on a quiet machine (ViT-B, 2 threads):
#   bash benchmarks/speed_round2.sh            # all steps; STEPS="2 4" bash benchmarks/speed_round2.sh: some
# Writes benchmarks/results/{attention,encoder}_*.{json,md} and int8_vnni.txt.
# 1. every attention kernel on one global ViT-B attention, interleaved with the matmul peak;
# 2. the whole encoder, fp32 at 1024: samvit (plain library use: load_encoder, no allocator tuning; default kernel
#    "auto", and sdpa_chunked alone) under glibc's default allocator and tuned, and the peers, 2 interleaved rounds;
# 3. torch.compile of the whole encoder (samvit-compiled);
# 4. bfloat16 (what dtype="auto" picks on a CPU with AVX512-BF16 or AMX) against the peers' autocast;
# 5. time per image against input size (512, 768, 1280; 1024 is in 2. and 4.);
# 6. int8 (signed int8 weights in onnxruntime) against float32 and bfloat16.
set -uo pipefail  # one failing step does not stop the others
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
STEPS=${STEPS:-1 2 3 4 5 6}
step() { [[ " $STEPS " == *" $1 "* ]]; }
if step 1; then
    $PY benchmarks/bench_attention.py --threads 2 --dtypes float32,bfloat16 --rounds 3 --out $OUT
fi
if step 2; then
    $PY -m samvit bench --impls samvit,samvit-sdpa,official,timm,transformers,onnxruntime,openvino \
        --dtypes float32 --allocators default,tuned --rounds 2 --repeats 2 --out $OUT --quiet
fi
if step 3; then
    $PY -m samvit bench --impls samvit-compiled --dtypes float32 --allocators default --repeats 2 --out $OUT --quiet
fi
if step 4; then
    $PY -m samvit bench --impls samvit,samvit-sdpa,official,transformers,openvino --dtypes bfloat16 \
        --allocators default --repeats 2 --out $OUT --quiet
fi
if step 5; then
    for size in 512 768 1280; do
        $PY -m samvit bench --impls samvit --img-size $size --dtypes float32,bfloat16 --allocators default \
            --repeats 2 --out $OUT --quiet
    done
fi
if step 6; then
    $PY benchmarks/bench_int8.py --model vit_b --threads 2 --rounds 2 \
        --variants fp32,bf16,ort_fp32,ort_int8,ort_int8_s8 --work /tmp/samvit_int8 | tee $OUT/int8_vnni.txt
fi
