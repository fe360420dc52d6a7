#!/usr/bin/env bash
# The whole CUDA extension, kernels and torch-facing glue, compiled and linked on a machine
# without a GPU: against the CUDA 13.0 build of torch 2.11 (the package index's default Linux
# wheel, the GPU machine's torch; it imports without a GPU), in a virtual environment of its own,
# from a copy of the tracked tree. Then the build is imported and the test suite runs on it (the
# CUDA tests skip without a GPU; the integration tests skip without transformers).
#
#   bash .ci/cuda_build.sh            # venv .venv-cuda (about 4.7 GB), tree build/cuda-tree
#   PSFT_CUDA_VENV=/path PSFT_CUDA_PYTHON=python3.12 bash .ci/cuda_build.sh
#
# build/cuda-tree/psft_ext/_C*.so is the library a GPU run can take along instead of compiling
# there (benchmarks/run_gpu_checks.sh); built with PSFT_CUDA_PYTHON, the Python of the GPU
# machine (3.12). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a" (about two minutes of build per
# arch on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${PSFT_CUDA_VENV:-$root/.venv-cuda}
tree=$root/build/cuda-tree
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch finds the toolkit from CUDA_HOME, else from where nvcc is; an nvcc linked into /usr/local/bin
# would make that /usr/local, which holds no CUDA headers.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
command -v nvcc >/dev/null || { echo "nvcc not found: the CUDA build needs the CUDA toolkit"; exit 1; }

[ -x "$venv/bin/python" ] || "${PSFT_CUDA_PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q -c .ci/constraints.txt torch==2.11.0 ninja numpy "pytest>=7" hypothesis
"$venv/bin/python" -c "import torch; assert torch.version.cuda, 'torch 2.11.0 is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

rm -rf "$tree"
mkdir -p "$tree"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$tree"
cd "$tree"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a} MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1 || { tail -60 build.log; exit 1; }
echo "built in $(( $(date +%s) - start )) s: $(ls psft_ext/_C*.so)"
"$venv/bin/python" -c "
import json, psft_ext
info = psft_ext.build_info()
assert info['cuda'], 'the build holds no CUDA kernels'
print(json.dumps({k: info[k] for k in ('cuda', 'cuda_archs', 'cpu_kernels', 'torch', 'torch_cuda')}))"
# The tests' subprocesses (benchmarks, examples, distributed workers) import this tree's build too.
PYTHONPATH=$tree "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
