"""Builds psft_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Build against the torch you already have (recommended; a build-isolated install would pull a torch
of its own):  pip install --no-build-isolation -e .

Environment knobs:
  PSFT_EXT_FORCE_CPU=1       build the CPU kernels only, even with a CUDA torch
  TORCH_CUDA_ARCH_LIST       CUDA archs to build (default here: "8.0;9.0a")
  PSFT_EXT_DEBUG=1           -O0 -g, for debugging the C++ side
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _with_cuda():
    if os.environ.get("PSFT_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    debug = os.environ.get("PSFT_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No errno, no FP traps: lets GCC turn the kernels' selects into SIMD blends (NaN still propagates).
    # No contraction of a * b + c into an FMA where the source does not ask for one: the kernels
    # round z / tau on its own in the statistics and in the gradient alike (as the CUDA kernels
    # do with __fmul_rn), so that they agree to the bit.
    cxx_flags = opt + ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = []
    link_args = []
    # at::parallel_for is inline code that, in OpenMP builds of torch (Linux), expands to
    # `#pragma omp parallel`: without -fopenmp here the CPU kernels would silently run on one
    # thread.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    if not _with_cuda():
        return CppExtension(
            "psft_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
            define_macros=define_macros,
        )
    # Hopper's own instructions (thread-block clusters, setmaxnreg) need sm_90a, which torch's
    # default arch list does not name; Ampere (sm_80) covers the other current data-centre GPUs.
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    define_macros += [("PSFT_WITH_CUDA", None), ("PSFT_CUDA_ARCHS", f'"{arch_list}"')]
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    nvcc_flags = opt + [
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # torch adds these to every nvcc call; our kernels need the real half/bf16 operators.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    return CUDAExtension(
        "psft_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_args,
        define_macros=define_macros,
    )


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Compiles into build/ of the source tree, whatever temporary directory the installer gives
    (pip's editable installs give a fresh one each time): ninja then recompiles only what
    changed, so a second `pip install -e` (other extras, or after editing one file) reuses the
    first one's objects. One folder per Python, torch and kernel set."""

    def finalize_options(self):
        super().finalize_options()
        kind = "cuda" if _with_cuda() else "cpu"
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{kind}"
        self.build_temp = os.path.join(HERE, "build", f"obj-{tag}")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
)
