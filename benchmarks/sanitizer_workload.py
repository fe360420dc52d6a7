"""A small CUDA workload that touches every kernel and launch configuration, for compute-sanitizer.

Run by benchmarks/run_gpu_checks.sh as `compute-sanitizer --tool memcheck python3 <this file>`:
sizes are small because the sanitizer slows kernels by orders of magnitude.
"""

import torch

import psft_ext


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # V = 40000 and 151936 also give the single-pass kernel's clusters of 1 to 8 CTAs.
        for n, vocab in ((1, 1), (3, 7), (5, 129), (37, 1000), (4, 4099), (2, 40000),
                         (3, 151936)):
            # An offset view so row starts are not 16-byte aligned, and a row stride > V.
            base = torch.randn(n, vocab + 3, device=dev).to(dtype)
            logits = base[:, 1:vocab + 1].requires_grad_(False).clone().requires_grad_(True)
            strided = base[:, 1:vocab + 1]
            targets = torch.randint(0, vocab, (n,), device=dev)
            targets[::3] = -100
            old = psft_ext.token_logprobs(strided, targets) + 0.3 * torch.randn(n, device=dev)
            loss, metrics = psft_ext.psft_loss(logits, targets, old, return_metrics=True,
                                               advantages=torch.randn(n, device=dev), dual_clip=3.0)
            (0.5 * loss).backward()  # an upstream gradient other than 1: scale_rows_ rescales
            # The gradient written over the logits (the fused linear loss's chunks) on a
            # contiguous copy, forward and backward.
            ops = torch.ops.psft_ext
            params = psft_ext.LossParams().op_args()
            work = logits.detach().clone()
            _, _, stats = ops.psft_fwd(work, targets, old, None, params, -100, "sum", None, 0.0,
                                       True, work)
            work = logits.detach().clone()
            ops.psft_bwd(torch.ones(n, device=dev), work, targets, stats, params, -100, work)
            psft_ext.token_logprobs(strided, targets.int(), with_entropy=True)
            x = strided.detach().clone().requires_grad_(True)
            psft_ext.psft_loss(x, targets, temperature=0.7, reduction="none").sum().backward()
            # Rows that share memory (row stride 0), read out of place.
            shared = strided[:1].expand(n, vocab)
            ops.psft_fwd(shared, targets, None, None, params, -100, "mean", None, 0.0, False,
                         torch.empty(n, vocab, dtype=dtype, device=dev))
            # A bad target id: the range check's kernel finds it and nothing reads the row.
            bad = targets.clone()
            bad[-1] = vocab
            try:
                psft_ext.psft_loss(logits, bad, old)
            except ValueError:
                pass
            else:
                raise AssertionError("an out-of-range target was not rejected")
    torch.cuda.synchronize()
    print("sanitizer workload done")


if __name__ == "__main__":
    main()
