#!/usr/bin/env bash
# GPU check, at most 8 minutes on one GPU: the CUDA-only tests, then the throughput benchmark.
#
#   scripts/gpu_check.sh [key=value ...]      # overrides go to bench/gpu.py's training workloads
#
# 1. `pytest -m cuda` (fp16 grad scaler, bf16, CUDA RNG resume, 2-GPU NCCL when 2 GPUs exist, compile,
#    TF32 / channels_last / pinned copies; tests/test_cuda.py and the other CUDA-marked tests), <= 4 min;
# 2. bench/gpu.py (ContraGAN-32 img/s, VideoMoCo R(2+1)D-18 clips/s, NT-Xent N=65536 vs lightly), <= 4 min,
#    writing bench/results/gpu.json and bench/results/gpu.md (with the pytest summary line).
# Exit status: non-zero when either part failed; both always run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python; fi
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $python; nothing to check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

mkdir -p bench/results
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # deterministic cuBLAS for bitwise resume tests
timeout 240 "$python" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee bench/results/gpu_pytest.txt
tests_rc=${PIPESTATUS[0]}

timeout 240 "$python" bench/gpu.py --out bench/results --pytest-log bench/results/gpu_pytest.txt "$@"
bench_rc=$?

echo "gpu_check.sh: pytest -m cuda exit ${tests_rc}, bench/gpu.py exit ${bench_rc}; see bench/results/gpu.md"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
