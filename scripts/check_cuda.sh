#!/usr/bin/env bash
# CUDA compile check that needs no GPU and no CUDA build of torch:
#  1. every csrc/cuda/*.cu with nvcc alone (torch-free) for sm_80 and sm_90, warnings as errors;
#  2. the torch binding csrc/bindings/cuda.cpp syntax-checked against torch's headers, which the
#     CPU wheel ships too (less one generated macro header, supplied here).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda: nvcc not on PATH"; exit 1; }
PY="${PY:-python3}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in csrc/cuda/*.cu; do
  nvcc -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O3 -fmad=false -Icsrc/include \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
  echo "check_cuda: $f ok (sm_80, sm_90)"
done

torch_inc=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_inc=""
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then cuda_inc="$d/include"; break; fi
done
[ -n "$cuda_inc" ] || { echo "check_cuda: cuda_runtime.h not found (set CUDA_HOME)"; exit 1; }
mkdir -p "$out/c10/cuda/impl"
[ -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$out/c10/cuda/impl/cuda_cmake_macros.h"
for f in csrc/bindings/cuda.cpp; do
  g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Icsrc/include \
    -isystem "$out" -isystem "$torch_inc" -isystem "$torch_inc/torch/csrc/api/include" \
    -isystem "$py_inc" -isystem "$cuda_inc" "$f"
  echo "check_cuda: $f ok (syntax against torch headers)"
done
