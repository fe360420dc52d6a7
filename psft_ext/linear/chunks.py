"""How the fused linear loss splits the N rows into chunks: the size of a chunk, and which chunks
need their logits formed at all."""

import torch

# One chunk of logits, counted as float32 (the kernels' working precision), when chunk_size=None.
# CPU: small enough to stay cache- and RAM-friendly on a laptop. CUDA: large enough that the
# grad_weight matmul (K = chunk rows) is compute-bound even though it reads and writes the float32
# accumulator once per chunk, and never more than a small share of the available memory.
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 1 << 30
CUDA_FREE_SHARE = 8  # at most 1/8 of the available device memory per chunk (floor: 128 rows)


def auto_chunk_rows(n: int, vocab: int, hidden_size: int, device: torch.device,
                    low_precision_grad_weight: bool = False) -> int:
    """Rows per chunk when ``chunk_size`` is None.

    About CPU_CHUNK_BYTES / CUDA_CHUNK_BYTES of float32-equivalent logits (on CUDA at most
    1 / CUDA_FREE_SHARE of the memory available, :func:`available_cuda_memory`, but never fewer
    than 128 rows: smaller chunks would run one pass over grad_weight per few rows), split into
    equal chunks, a multiple of 8 rows (128 on CUDA: whole tiles for the matmuls); at least 1 and
    at most ``n``.

    On CUDA, when grad_weight of a bfloat16 / float16 weight is accumulated across chunks
    (``low_precision_grad_weight``), every chunk's grad_weight matmul reads and writes the whole
    V x H accumulator, so chunks of at least H / 2 rows keep those passes a small share of the
    time (measured on an H200, N = 16384, H = 4096, V = 151936, float32 accumulator: 1.19x the
    bare matmuls at 1024 rows, 1.11x at 2048). Such a chunk (2 x rows x V bytes) is at most half
    the size of grad_weight's float32 accumulator. And N <= H tokens take one chunk: a single
    chunk needs no accumulator (its one matmul accumulates in float32 and rounds once).
    """
    if n <= 0:
        return 1
    vocab = max(vocab, 1)
    if device.type == "cuda":
        align = 128
        rows = CUDA_CHUNK_BYTES // (4 * vocab)
        if low_precision_grad_weight:
            rows = n if n <= hidden_size else max(rows, hidden_size // 2)
        cap = available_cuda_memory(device) // CUDA_FREE_SHARE // (4 * vocab)
        rows = min(rows, max(cap, align))
    else:
        rows = CPU_CHUNK_BYTES // (4 * vocab)
        align = 8
    rows = max(1, min(rows, n))
    # Equal chunks rather than full ones and a short remainder (a matmul of few rows wastes most
    # of its tiles), rounded up to whole tiles.
    rows = -(-n // -(-n // rows))
    if rows > align:
        rows = -(-rows // align) * align
    return min(rows, n)


def available_cuda_memory(device: torch.device) -> int:
    """Bytes a chunk can take on a CUDA device: the driver's free memory plus what torch's
    caching allocator holds unused. In a training loop the cache holds most of the device between
    steps (the last step's chunks and accumulator among it), which the driver counts as used:
    from free memory alone, chunks would shrink step after step (and their boundaries, hence the
    sums' order, change)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_rows(hidden, weight, chunk_size, compute_dtype=None, need_weight=False,
               accumulate_float32=True):
    """``chunk_size`` if given (> 0; at most the number of rows, so a chunk size larger than the
    call allocates nothing beyond it), else :func:`auto_chunk_rows` for these operands."""
    if chunk_size > 0:
        return max(1, min(chunk_size, hidden.shape[0]))
    # H / 2-row chunks hide under the float32 accumulator's own peak (auto_chunk_rows); without
    # one (accumulate_float32=False, chosen for memory) the chunk budget rules.
    low = (need_weight and accumulate_float32 and compute_dtype in (torch.bfloat16, torch.float16)
           and weight.dtype == compute_dtype)
    return auto_chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.device, low)


def chunk_bounds(n, rows, active):
    """[(start, end)] of the chunks of ``rows`` rows holding at least one active row (one host
    sync for all of them, rather than one per chunk)."""
    if n == 0:
        return []
    n_chunks = -(-n // rows)
    pad = n_chunks * rows - n
    flags = torch.nn.functional.pad(active.to(torch.int8), (0, pad)).view(n_chunks, rows).any(1)
    return [(i * rows, min(n, (i + 1) * rows)) for i, keep in enumerate(flags.tolist()) if keep]
