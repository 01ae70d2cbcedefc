#!/usr/bin/env bash
# The speed measurements of issue 23 (round 3), one after another on a QUIET machine (ViT-B at 1024, 2 threads):
#   bash benchmarks/speed_round3.sh                 # all steps (about 40-60 min on a 2-core AMX VM)
#   STEPS="1 2 7" bash benchmarks/speed_round3.sh   # some; PY=... for another interpreter
# Nothing else may run meanwhile (with 2 threads a third busy process stalls every parallel region): the script
# records the load average before each step and warns when it is above 0.5.
# 1. float32: samvit (kernel auto; sdpa_chunked alone) vs official, timm, transformers, ONNX Runtime, OpenVINO, under
#    glibc's default allocator and tuned, 2 interleaved rounds (each run in a fresh process, in-run matmul peak);
# 2. bfloat16 (what dtype="auto" picks on AMX / AVX512-BF16): samvit vs the peers' autocast, OpenVINO bf16;
# 3. the profile per op category, float32 and bfloat16, and which GEMMs reach AMX (ONEDNN_VERBOSE / MKL_VERBOSE);
# 4. every attention kernel on one global ViT-B attention (bench_attention.py), fp32 and bf16, with the fused
#    bias_softmax candidate and other chunk sizes; the linear layers against oneDNN's packed linears with fused
#    GELU / residual add and MKL's packed SGEMM (bench_linear.py);
# 5. torch.compile of the whole encoder (samvit-compiled), fp32 and bf16;
# 6. int8: time (bench_int8.py: onnxruntime int8/uint8 weights vs samvit fp32/bf16) and accuracy
#    (int8_accuracy.py: cosine and mask IoU against float32 on the scikit-image photos; random weights unless
#    CHECKPOINT=sam_vit_b_01ec64.pth is set, which is the run that decides whether int8 is offered);
# 7. README's speed table from steps 1 and 2 (benchmarks/speed_table.py) -> $OUT/readme_speed_table.md, and the
#    machine line (lscpu flags, date).
set -uo pipefail  # one failing step does not stop the others
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS-1 2 3 4 5 6 7}  # set but empty: no step (the machine line only)
CHECKPOINT=${CHECKPOINT:-}
mkdir -p "$OUT"
LOG="$OUT/speed_round3_$(date -u +%Y%m%d-%H%M%S).log"
step() { [[ " $STEPS " == *" $1 "* ]]; }
quiet() {  # the load average before a step, and a warning when the machine is not quiet
    local load; load=$(cut -d' ' -f1 /proc/loadavg)
    echo "step $1: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load average $load" | tee -a "$LOG"
    awk -v l="$load" 'BEGIN { exit !(l > 0.5) }' && echo "WARNING: load $load > 0.5: the machine is not quiet" | tee -a "$LOG"
    return 0
}
newest() { ls -t "$OUT"/encoder_vit_b_*.json 2>/dev/null | head -1; }
{ lscpu | grep -E "Model name|^CPU\(s\)"; echo "flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|amx_bf16|amx_int8|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  $PY -c "import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"; } | tee -a "$LOG"
FP32_JSON="" BF16_JSON=""
if step 1; then
    quiet 1
    $PY -m samvit bench --impls samvit,samvit-sdpa,official,timm,transformers,onnxruntime,openvino \
        --dtypes float32 --allocators default,tuned --rounds 2 --repeats 2 --out "$OUT" --quiet \
        --label "speed round 3, step 1 (float32)" | tee -a "$LOG"
    FP32_JSON=$(newest)
fi
if step 2; then
    quiet 2
    $PY -m samvit bench --impls samvit,samvit-sdpa,official,timm,transformers,openvino --dtypes bfloat16 \
        --allocators default --rounds 2 --repeats 2 --out "$OUT" --quiet \
        --label "speed round 3, step 2 (bfloat16)" | tee -a "$LOG"
    BF16_JSON=$(newest)
fi
if step 3; then
    quiet 3
    $PY benchmarks/profile_encoder.py --model vit_b --threads 2 --dtypes float32,bfloat16 \
        --out "$OUT/profile_vit_b_$(date -u +%Y%m%d).md" | tail -n 80 | tee -a "$LOG"
fi
if step 4; then
    quiet 4
    $PY benchmarks/bench_attention.py --threads 2 --dtypes float32,bfloat16 --rounds 3 \
        --chunk-elems 1048576,8388608 --out "$OUT" | tee -a "$LOG"
    $PY benchmarks/bench_linear.py --threads 2 --rounds 5 --out "$OUT/linear_vit_b_$(date -u +%Y%m%d).md" | tee -a "$LOG"
fi
if step 5; then
    quiet 5
    $PY -m samvit bench --impls samvit-compiled --dtypes float32,bfloat16 --allocators default --repeats 2 \
        --out "$OUT" --quiet --label "speed round 3, step 5 (torch.compile)" | tee -a "$LOG"
fi
if step 6; then
    quiet 6
    $PY benchmarks/bench_int8.py --model vit_b --threads 2 --rounds 2 --work /tmp/samvit_int8 \
        --variants fp32,bf16,ort_fp32,ort_int8,ort_int8_s8 | tee "$OUT/int8_amx.txt" | tee -a "$LOG"
    $PY benchmarks/int8_accuracy.py --model vit_b --threads 2 ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} \
        --out "$OUT/int8_accuracy_vit_b$([[ -n $CHECKPOINT ]] && echo _checkpoint).md" | tee -a "$LOG"
fi
if step 7; then
    # steps 1 and 2 of this invocation; else the newest float32 and bfloat16 records in $OUT
    if [[ -z $FP32_JSON || -z $BF16_JSON ]]; then
        for f in $(ls -t "$OUT"/encoder_vit_b_*.json); do
            dt=$($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(' '.join(sorted({x['dtype'] for x in r['runs']})))" "$f")
            [[ -z $FP32_JSON && $dt == *float32* ]] && FP32_JSON=$f
            [[ -z $BF16_JSON && $dt == *bfloat16* ]] && BF16_JSON=$f
        done
    fi
    $PY benchmarks/speed_table.py "$FP32_JSON" $BF16_JSON --out "$OUT/readme_speed_table.md" | tee -a "$LOG"
    echo "README: replace the table under '## Speed' with $OUT/readme_speed_table.md" | tee -a "$LOG"
fi
