#!/usr/bin/env bash
# Syntax-checks the torch-facing CUDA glue (csrc/cuda/psft_cuda.cpp and the CUDA-only branches
# of csrc/psft_checks.cpp and csrc/psft_reduced.cpp) on a machine whose torch has no CUDA:
# compiled with -fsyntax-only against this torch's headers and the CUDA toolkit's.
# The CPU wheel ships c10's CUDA headers but not the one CMake generates for a CUDA build
# (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in is enough to parse the glue.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_inc=
for d in ${CUDA_HOME:-} /usr/local/cuda /usr/local/cuda-*; do
  if [ -f "$d/include/cuda_runtime.h" ]; then cuda_inc=$d/include; break; fi
done
[ -n "$cuda_inc" ] || { echo "CUDA headers not found; glue check skipped"; exit 0; }
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t inc < <(python -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()['include']]: print('-I' + p)")
# psft_checks.cpp and psft_reduced.cpp too: their CUDA branches (the device range check, the
# reduced loss's CUDA registration) are only compiled in CUDA builds.
for f in csrc/cuda/psft_cuda.cpp csrc/psft_checks.cpp csrc/psft_reduced.cpp; do
  g++ -std=c++20 -fsyntax-only -I"$stub" "${inc[@]}" -I"$cuda_inc" -DPSFT_WITH_CUDA "$f"
done
echo "CUDA glue (csrc/cuda/psft_cuda.cpp; psft_checks.cpp, psft_reduced.cpp with PSFT_WITH_CUDA) parses against torch $(python -c 'import torch; print(torch.__version__)')"
