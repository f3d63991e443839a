#!/usr/bin/env bash
# The GPU benchmark suite, for one H100/H200: ours vs diffusers' StableDiffusionPipeline on
# the SD 1.5 shapes (random weights, built in code), 512x512, dpmpp_2m, guidance 7.5, SDPA:
#   float16  batch 1 (+ ours without its text cache), 8 (+ ours channels-last),
#            16 (+ ours decoding the batch at once), 30 steps
#   bfloat16 batch 8, 30 steps
# with images/s, UNet-loop s/step, peak memory, UNet TFLOP/s and MFU, ratios and a pixel
# diff against diffusers. Sized to finish in under 4 minutes on an H100 (estimated, not yet
# timed on one); a hard `timeout` (SUITE_TIMEOUT, 225 s) guards that, and rows are written
# as each config finishes, so a cut-short run keeps what it measured.
# The full grid (float16/bfloat16 x batch 1/4/8/16 x 30/50 steps) takes longer:
#   python3 benchmarks/compare_diffusers.py --device cuda --out OUT_DIR/full_grid.md
#
# Usage (from anywhere):  benchmarks/gpu_suite.sh OUT_DIR
# Needs python3 with torch (>= 2.4, CUDA) and transformers; the lent GPU machines have both
# but not diffusers: its wheel and importlib_metadata's wait in .whl/ (untracked; fetch them
# with `pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata`), carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && benchmarks/gpu_suite.sh $OUT
# Writes OUT_DIR/environment.txt, OUT_DIR/compare_diffusers.md (the table) and
# OUT_DIR/compare_diffusers.log (everything printed). Env: PYTHON (default python3),
# PEAK_TFLOPS (default 989, H100/H200 SXM dense fp16/bf16), SUITE_TIMEOUT (default 225 s),
# COMPILE=+compile adds a torch.compile row to float16 batch 8 (compiling the SD 1.5 UNet
# takes a minute or two more; raise SUITE_TIMEOUT with it). JOBS=1 adds a second stage:
# job_overhead.py on a random SD 1.5-shaped folder (64 rows, float16, batch 8, 30 steps,
# one GPU actor; JOBS_TIMEOUT, default 240 s) into OUT_DIR/job_overhead.log; it needs Ray,
# pyarrow and the project's other dependencies on the machine. SDXL=1 (the default; SDXL=0
# skips it) adds the SDXL stage: compare_diffusers.py --family sdxl on the SDXL base 1.0
# shapes (random weights saved as a diffusers folder and loaded as users load it; the log
# starts with the load's peak host RSS), float16 batch 1 and 4, 30 steps, 1024x1024
# (SDXL_TIMEOUT, default 300 s) into OUT_DIR/compare_diffusers_sdxl.md / .log.
set -uo pipefail

OUT_DIR=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import sys, torch, diffusers, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__); print(torch.cuda.get_device_name())'
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

timeout "${SUITE_TIMEOUT:-225}" "$PY" benchmarks/compare_diffusers.py --device cuda \
  --configs "float16:1:30:no-text-cache,float16:8:30:layout${COMPILE:+$COMPILE},float16:16:30:whole-decode,bfloat16:8:30" \
  --repeats 3 --warmup 1 --peak-tflops "${PEAK_TFLOPS:-989}" \
  --out "$OUT_DIR/compare_diffusers.md" 2>&1 | tee "$OUT_DIR/compare_diffusers.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ]; then
  echo "gpu_suite: stopped at the time limit; the rows above were measured" | tee -a "$OUT_DIR/compare_diffusers.log"
fi
if [ "${SDXL:-1}" = 1 ]; then
  # SDXL base shapes at 1024x1024, float16, batch 1 and 4, 30 steps; the load's peak host
  # RSS against the weights' size comes first in the log
  timeout "${SDXL_TIMEOUT:-300}" "$PY" benchmarks/compare_diffusers.py --device cuda --family sdxl \
    --configs "float16:1:30,float16:4:30" --repeats 3 --warmup 1 --peak-tflops "${PEAK_TFLOPS:-989}" \
    --out "$OUT_DIR/compare_diffusers_sdxl.md" 2>&1 | tee "$OUT_DIR/compare_diffusers_sdxl.log"
  sdxl_status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$sdxl_status
fi
if [ "${JOBS:-0}" = 1 ]; then
  timeout "${JOBS_TIMEOUT:-240}" "$PY" benchmarks/job_overhead.py --model sd15-random \
    --gpus-per-actor 1 --size 512 --steps 30 --rows 64 --batch 8 --rows-per-shard 32 \
    --repeats 1 2>&1 | tee "$OUT_DIR/job_overhead.log"
  jobs_status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$jobs_status
fi
echo "tables in $OUT_DIR"
exit "$status"
