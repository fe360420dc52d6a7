"""What this build of psft_ext holds, for bug reports and benchmark records."""

import json

import torch

from ._ops import ops


def build_info() -> dict:
    """Kernels in this build (CPU, CUDA and its archs), the CPU row loops this process runs
    ("avx2" or "baseline"), torch and CUDA versions, visible GPUs."""
    info = json.loads(ops.build_info())
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
