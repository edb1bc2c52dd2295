#!/usr/bin/env bash
# The serving benchmark on a GPU machine: fp32, fp16 and int8 ResNet50 at 224² in process with ONNX
# Runtime's CUDA and TensorRT execution providers. Prepared, not yet run: no GPU has been available.
#
#   make install && .venv/bin/pip install -c constraints.txt onnxruntime-gpu   # replaces the CPU onnxruntime
#   bash benchmarks/serving_gpu.sh [OUT_DIR]                                  # about 10 minutes
#
# Writes OUT_DIR/serving-cuda.json and serving-tensorrt.json (default reports/serving) and prints a
# table per provider. Served GPU figures need Triton's onnxruntime backend (the NGC container) and the
# k8s gpu overlay; the local Triton runs on the CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-reports/serving}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
.venv/bin/python -c 'import onnxruntime as ort, sys; p = ort.get_available_providers(); print("onnxruntime", ort.__version__, p); sys.exit("TensorrtExecutionProvider" not in p and "CUDAExecutionProvider" not in p)'
for provider in cuda tensorrt; do
  timeout 600 .venv/bin/python benchmarks/serving.py --provider "$provider" --seconds 3 --out "$out"
done
