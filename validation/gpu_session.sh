#!/usr/bin/env bash
# What one lent GPU session runs (see validation/README.md). Usage: gpu_session.sh STAGE OUT_DIR
#   setup-and-calibrate: GPU tests, INT8 benchmark, calibration
#   matrix CASES:        validation matrix cases (comma-separated indices of run_matrix.GPU_CASES)
#   inference:           issue 13's GPU checks (validation/inference.py gpu): a 7B INT8 model through layer
#                        offload under an emulated 8 GiB card, and a resident bf16 decode
set -uo pipefail
stage=$1; out=$2; shift 2
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
case "$stage" in
  setup-and-calibrate)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia_smi.txt"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/nvidia_smi.txt"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_int8.py 2>&1 | tail -15 | tee "$out/pytest_gpu.txt"
    timeout 120 python3 benchmarks/int8_gemm.py --out "$out/int8_gemm.json" 2>&1 | tail -12
    timeout 150 python3 -m trainplan.cli calibrate --out "$out/calibration.json" 2>&1 | tail -3
    ;;
  inference)
    timeout 570 python3 -m pytest -q -p no:cacheprovider tests/test_inference.py -k gpu 2>&1 | tail -5
    timeout 570 python3 validation/inference.py gpu "$out/inference_gpu.json" 2>&1 | tail -20
    ;;
  matrix)
    timeout 570 python3 validation/run_matrix.py gpu "$out/gpu_matrix.json" "$1" 2>&1 | tail -20
    ;;
esac
