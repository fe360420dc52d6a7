"""Fused linear PSFT: the LM head's matmul and the PSFT loss, without ever materializing the logits.

``linear_psft_loss(hidden, weight, targets, ...)`` equals
``psft_loss(hidden @ weight.T + bias, ...)`` (loss, metrics and the gradients of hidden, weight
and bias) but walks the N tokens in chunks of rows: for each chunk it forms the chunk's logits
with one matmul (cuBLAS / the CPU BLAS through torch), runs the fused PSFT kernels on them and
turns the logits' gradient straight into
``grad_hidden[chunk] = g @ weight`` and ``grad_weight += g.T @ hidden[chunk]``; the chunk's logits
and gradient are then dropped. The kernels write the gradient over the chunk's logits
(``psft_forward_backward_``, ``psft_backward_``), so one chunk of logits is alive at a time,
never a second one for its gradient.

Peak memory above the inputs: grad_hidden, grad_weight and one chunk of logits. With bfloat16 /
float16 weights and more than one chunk, grad_weight is by default accumulated across chunks in
float32 (``accumulate_float32=True``): 2 V H bytes of float32 instead of the V H of the result,
held as two halves of the vocabulary so that the final cast narrows them into the first half's
own memory (no third buffer at the end). ``accumulate_float32=False`` accumulates in the weight's
dtype instead (each chunk's product, computed in float32 inside the matmul, is rounded into the
running sum once): the peak is then the gradients and one chunk, at the price of one rounding per
chunk.

Reductions and the gradient. The logits' gradient must be formed while the chunk's logits exist,
i.e. inside the forward. For "mean" and "sum" the upstream gradient of every token's loss is the
same scalar times the reduction's weight (1 / denominator, or 1), so the forward computes the
gradients of the reduced loss itself and the backward only scales them by the upstream scalar
(exactly 1 in the usual ``loss.backward()``: no rounding added). For "none" the upstream
per-token gradient is unknown in the forward, so the forward keeps only per-token lse and coef and
the backward recomputes each chunk's logits (one more matmul pass, still chunked). float16
compute takes that path for every reduction: a chunk gradient formed in the forward for
1 / denominator would be rounded to float16 before a GradScaler's scale reaches it, and mostly
flush to zero.

Nothing is computed for inputs that do not require a gradient, nor under ``torch.no_grad()``.
Under ``torch.autocast`` the chunk logits and matmuls run in the autocast dtype, as
``F.linear`` would; the gradients come back in the inputs' dtypes (a float32 weight's gradient is
accumulated in float32, its own dtype; ``grad_bias`` is accumulated like ``grad_weight``).

The chunk loops live in custom ops (``psft_ext::linear_psft_*``, registered with fake kernels and
autograd), so ``torch.compile`` traces a caller without graph breaks and without unrolling them.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._ops import ops
from .loss import (
    LOGITS_DTYPES,
    _check_finite,
    _check_ignore_index,
    _check_loss_options,
    _check_targets,
    _mean_denominator,
    _metrics,
    _old_and_advantages,
    _reduce_in_python,
    _targets_for,
)

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
    1 / CUDA_FREE_SHARE of the memory available, :func:`_available_cuda_memory`, but never fewer
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
        cap = _available_cuda_memory(device) // CUDA_FREE_SHARE // (4 * vocab)
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


def _available_cuda_memory(device: torch.device) -> int:
    """Bytes a chunk can take on a CUDA device: the driver's free memory plus what torch's
    caching allocator holds unused. In a training loop the cache holds most of the device between
    steps (the last step's chunks and accumulator among it), which the driver counts as used:
    from free memory alone, chunks would shrink step after step (and their boundaries, hence the
    sums' order, change)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# ----------------------------------------------------------------------------------------------
# The chunk loops (eager; run inside the custom ops' implementations)
# ----------------------------------------------------------------------------------------------


def _chunk_bounds(n, rows, active):
    """[(start, end)] of the chunks of ``rows`` rows holding at least one active row (one host
    sync for all of them, rather than one per chunk)."""
    if n == 0:
        return []
    n_chunks = -(-n // rows)
    pad = n_chunks * rows - n
    flags = torch.nn.functional.pad(active.to(torch.int8), (0, pad)).view(n_chunks, rows).any(1)
    return [(i * rows, min(n, (i + 1) * rows)) for i, keep in enumerate(flags.tolist()) if keep]


def _rows(hidden, weight, chunk_size, compute_dtype=None, need_weight=False,
          accumulate_float32=True):
    if chunk_size > 0:
        return chunk_size
    # H / 2-row chunks hide under the float32 accumulator's own peak (auto_chunk_rows); without
    # one (accumulate_float32=False, chosen for memory) the chunk budget rules.
    low = (need_weight and accumulate_float32 and compute_dtype in (torch.bfloat16, torch.float16)
           and weight.dtype == compute_dtype)
    return auto_chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.device, low)


def _chunk_logits(h, weight, bias):
    """One chunk of logits, ``h @ weight.T + bias``, in the dtype of its operands."""
    if bias is None:
        return torch.mm(h, weight.t())
    return torch.addmm(bias, h, weight.t())


class _Operands:
    """hidden, weight and bias as the matmuls use them: cast once to the compute dtype (the
    autocast dtype, or the inputs' own), as autocast would cast them for ``F.linear``."""

    def __init__(self, hidden, weight, bias, compute_dtype):
        self.hidden = hidden
        self.weight = weight.to(compute_dtype).contiguous()
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.dtype = compute_dtype

    def hidden_rows(self, start, end):
        return self.hidden[start:end].to(self.dtype)


class _GradAccumulator:
    """grad_hidden rows, grad_weight and grad_bias of a sequence of chunk gradients ``g``."""

    def __init__(self, hidden, weight, bias, compute_dtype, need_hidden, need_weight, need_bias,
                 n_chunks, accumulate_float32):
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        low = compute_dtype in (torch.bfloat16, torch.float16)
        acc = torch.float32 if low else compute_dtype
        if weight.dtype == compute_dtype and (n_chunks <= 1 or not accumulate_float32):
            # One matmul makes all of grad_weight (it accumulates in float32 inside and rounds
            # once, as the float32 accumulator and its cast would), or the caller chose to
            # accumulate in the weight's dtype: no V x H float32 buffer.
            acc = compute_dtype
        # A float32 accumulator of a 2-byte weight's gradient is kept as two halves of the
        # vocabulary, so the result can be narrowed into the first half's memory.
        self.halves = acc == torch.float32 and self.weight_dtype != torch.float32
        # Zeros: the rows of skipped (all-ignored) chunks are never written. Contiguous whatever
        # hidden's strides (zeros_like would keep a column-major hidden's): the layout the fake
        # kernels promise, and row slices the chunk matmuls can write into directly.
        self.gh = (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                   if need_hidden else None)
        # grad_weight is allocated by the first chunk that adds to it, and not zeroed: the first
        # chunk overwrites it (a pass over V x H saved).
        self.need_weight, self.gw, self.gw_spec = need_weight, None, (tuple(weight.shape), acc)
        self.gb = (torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
                   if need_bias else None)
        self.device = weight.device

    def _new_weight_grad(self, factory):
        """grad_weight's accumulator: [one (V, H) tensor], or its [top, bottom] halves."""
        (vocab, hidden_size), dtype = self.gw_spec
        if not self.halves:
            return [factory((vocab, hidden_size), dtype=dtype, device=self.device)]
        top = -(-vocab // 2)
        return [factory((top, hidden_size), dtype=dtype, device=self.device),
                factory((vocab - top, hidden_size), dtype=dtype, device=self.device)]

    @property
    def needed(self):
        return self.gh is not None or self.need_weight or self.gb is not None

    def add(self, g, h, weight, start, end):
        if self.gh is not None:
            if self.gh.dtype == g.dtype:
                torch.mm(g, weight, out=self.gh[start:end])
            else:  # autocast: the matmul in the compute dtype, the result in hidden's dtype
                self.gh[start:end] = torch.mm(g, weight)
        if self.need_weight:
            first = self.gw is None
            if first:
                self.gw = self._new_weight_grad(torch.empty)
            rows = 0
            for part in self.gw:
                _accumulate_mm(part, g.t()[rows:rows + part.shape[0]], h, overwrite=first)
                rows += part.shape[0]
        if self.gb is not None:
            self.gb += g.sum(0, dtype=self.gb.dtype)

    def results(self, hidden, weight, bias):
        """The gradients in the inputs' dtypes; empty tensors for those not computed (custom
        ops cannot return None)."""
        gh = self.gh if self.gh is not None else hidden.new_empty(0)
        if self.need_weight and self.gw is None:  # every chunk was skipped
            self.gw = self._new_weight_grad(torch.zeros)
        if self.gw is None:
            gw = weight.new_empty(0)
        elif self.halves:
            gw = _narrow_halves(*self.gw, self.weight_dtype)
        else:
            gw = self.gw[0].to(self.weight_dtype)
        self.gw = None
        gb = (self.gb.to(self.bias_dtype) if self.gb is not None
              else (weight if bias is None else bias).new_empty(0))
        return gh, gw, gb


def _narrow_halves(top, bottom, dtype):
    """The 2-byte ``dtype`` (V, H) matrix [top; bottom] of two float32 halves (top has
    ceil(V / 2) rows), written into top's own memory: its 4 x ceil(V / 2) x H bytes hold the
    2 x V x H of the result, so the cast needs no third V x H buffer.

    top is narrowed in place front to back in blocks of rows [a, 2a): such a block's 2-byte rows
    land on bytes [2aH, 4aH), below the float32 rows it reads (bytes [4aH, 8aH)) and over float32
    rows already read; the first rows go through a small copy. The bottom half then lands on
    bytes [2 ceil(V/2) H, 2VH), over float32 rows of top that were all read by then.
    """
    top_rows, hidden_size = top.shape
    vocab = top_rows + bottom.shape[0]
    out = torch.empty(0, dtype=dtype, device=top.device).set_(
        top.untyped_storage(), 0, (vocab, hidden_size), (hidden_size, 1))
    first = min(top_rows, 64)
    head = top[:first].to(dtype)
    start = first
    while start < top_rows:
        end = min(2 * start, top_rows)
        out[start:end].copy_(top[start:end])
        start = end
    out[:first].copy_(head)
    out[top_rows:].copy_(bottom)
    return out


# Whether this torch's CUDA addmm takes low-precision operands with a float32 ``out`` that is also
# the added term (``addmm.dtype_out`` with self == out; torch 2.11 does, older ones may not).
# None: not tried yet.
_CUDA_F32_ADDMM = None


def _accumulate_mm(acc, a, b, overwrite):
    """``acc += a @ b`` (``acc = a @ b`` with overwrite, whatever acc holds), acc in float32 when a
    and b are bfloat16 / float16."""
    global _CUDA_F32_ADDMM
    beta = 0 if overwrite else 1  # beta = 0: acc is not read (uninitialized memory is fine)
    if not acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        # The CPU BLAS has no low-precision product with a float32 output, and its in-place
        # low-precision addmm makes float32 temporaries of the output's size: the product in
        # float32 (exact products, float32 sums) in blocks of acc's rows, so the temporaries stay
        # small, added to acc with one rounding when acc is low-precision (add_ then also makes a
        # float32 copy of the block of acc: 8 MiB blocks keep all of them small).
        block = max(1, (8 << 20) // max(1, b.shape[1] * 4))
        b32 = b.float()
        for start in range(0, a.shape[0], block):
            part, a32 = acc[start:start + block], a[start:start + block].float()
            if part.dtype == torch.float32:
                part.addmm_(a32, b32, beta=beta)
            elif overwrite:
                part.copy_(torch.mm(a32, b32))
            else:
                part.add_(torch.mm(a32, b32))
        return
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=beta)
        return
    if acc.is_cuda:
        if _CUDA_F32_ADDMM is not False:
            try:
                # cuBLAS reads and writes the float32 accumulator in the epilogue: no temporary.
                torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
                _CUDA_F32_ADDMM = True
                return
            except torch.OutOfMemoryError:
                raise  # says nothing about the op's support
            except (RuntimeError, TypeError):
                if _CUDA_F32_ADDMM:
                    raise
                _CUDA_F32_ADDMM = False
        # Older torch: the low-precision product of a block of rows (rounded once per chunk),
        # summed in float32; blocks keep the temporary small.
        if overwrite:
            acc.zero_()
        block = max(1, (64 << 20) // max(1, b.shape[1] * a.element_size()))
        for start in range(0, a.shape[0], block):
            acc[start:start + block] += torch.mm(a[start:start + block], b)
        return
    acc.addmm_(a, b, beta=beta)  # float32 x float32 into float32 (CPU)


def _run_forward(hidden, weight, bias, targets, old, adv, adv_scalar, clip_low, clip_high,
                 dual_clip, ignore_index, temperature, chunk_size, compute_dtype, grad_weights,
                 need_hidden, need_weight, need_bias, accumulate_float32=True):
    """Per-token outputs of psft_forward over all rows (8 float32 (N,) tensors, ignored rows and
    skipped chunks 0) and, when any need_* is set, the gradients of ``sum_t grad_weights[t] *
    loss[t]``, computed chunk by chunk."""
    n = hidden.shape[0]
    per_token = [torch.zeros(n, dtype=torch.float32, device=hidden.device) for _ in range(8)]
    rows = _rows(hidden, weight, chunk_size, compute_dtype, need_weight, accumulate_float32)
    bounds = _chunk_bounds(n, rows, targets != ignore_index)
    grads = _GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                             need_bias, len(bounds), accumulate_float32)
    operands = _Operands(hidden, weight, bias, compute_dtype)
    for start, end in bounds:
        h = operands.hidden_rows(start, end)
        logits = _chunk_logits(h, operands.weight, operands.bias)
        rest = (targets[start:end], None if old is None else old[start:end],
                None if adv is None else adv[start:end], adv_scalar, clip_low, clip_high,
                dual_clip, ignore_index, temperature)
        if grads.needed:
            # One pass over the chunk: the outputs, and the gradient written over the logits.
            outs = ops.psft_forward_backward_(logits, *rest, grad_weights[start:end])
            grads.add(logits, h, operands.weight, start, end)
        else:
            outs = ops.psft_forward(logits, *rest)
        for dst, src in zip(per_token, outs):
            dst[start:end] = src
        # Dropped now, not when the next chunk rebinds the name: the next chunk's logits would
        # otherwise be allocated while this one is still alive (so no other name may hold them).
        del logits
    return per_token, grads.results(hidden, weight, bias)


def _run_backward(grad_loss, hidden, weight, bias, targets, lse, coef, ignore_index, temperature,
                  chunk_size, compute_dtype, need_hidden, need_weight, need_bias,
                  accumulate_float32=True):
    """Gradients of ``sum_t grad_loss[t] * loss[t]`` from the forward's lse and coef, recomputing
    the logits of every chunk that has a row with a non-zero ``grad_loss * coef``."""
    n = hidden.shape[0]
    rows = _rows(hidden, weight, chunk_size, compute_dtype, need_weight, accumulate_float32)
    bounds = _chunk_bounds(n, rows, (grad_loss * coef) != 0)
    grads = _GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                             need_bias, len(bounds), accumulate_float32)
    operands = _Operands(hidden, weight, bias, compute_dtype)
    for start, end in bounds:
        h = operands.hidden_rows(start, end)
        logits = _chunk_logits(h, operands.weight, operands.bias)
        ops.psft_backward_(grad_loss[start:end], logits, targets[start:end], lse[start:end],
                           coef[start:end], ignore_index, temperature)  # over the logits
        grads.add(logits, h, operands.weight, start, end)
        del logits  # before the next chunk's logits exist (see _run_forward)
    return grads.results(hidden, weight, bias)


def _no_autocast(device):
    # The matmuls must run in the dtype chosen by the caller (the autocast dtype is passed in
    # explicitly), not be recast by an autocast region the op was called from.
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

def _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias):
    gh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    b = weight if bias is None else bias
    gb = b.new_empty((weight.shape[0],) if need_bias else (0,))
    return gh, gw, gb


@torch.library.custom_op("psft_ext::linear_psft_forward", mutates_args=())
def linear_psft_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    old_logprobs: Optional[Tensor], advantages: Optional[Tensor], advantage: float,
    clip_low: float, clip_high: float, dual_clip: float, ignore_index: int, temperature: float,
    denominator: Optional[Tensor], denominator_value: float, chunk_size: int,
    compute_dtype: torch.dtype, need_hidden: bool, need_weight: bool, need_bias: bool,
    accumulate_float32: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reduced PSFT loss ``sum_t loss_t / denominator`` over chunks of ``hidden @ weight.T + bias``.

    ``denominator`` (0-d float32) or, when None, ``denominator_value`` (1 for reduction "sum").
    Returns (loss, per-token loss, logp, entropy, ratio, log_ratio, clipped, grad_hidden,
    grad_weight, grad_bias): the gradients are those of the returned loss for the inputs whose
    need_* is set (empty tensors for the others), computed here while each chunk's logits exist.
    """
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        den = (denominator if denominator is not None
               else torch.full((), denominator_value, dtype=torch.float32, device=hidden.device))
        # d(sum_t loss_t / den) / d loss_t, the same float32 value autograd would feed the
        # unfused loss's backward.
        weights = (torch.ones((), dtype=torch.float32, device=hidden.device) / den).expand(n)
        per_token, grads = _run_forward(
            hidden, weight, bias, targets, old_logprobs, advantages, advantage, clip_low,
            clip_high, dual_clip, ignore_index, temperature, chunk_size, compute_dtype, weights,
            need_hidden, need_weight, need_bias, accumulate_float32)
        loss_rows = per_token[0]
        loss = loss_rows.sum() / den
        return (loss, *per_token[:6], *grads)


@linear_psft_forward.register_fake
def _(hidden, weight, bias, targets, old_logprobs, advantages, advantage, clip_low, clip_high,
      dual_clip, ignore_index, temperature, denominator, denominator_value, chunk_size,
      compute_dtype, need_hidden, need_weight, need_bias, accumulate_float32=True):
    n = hidden.shape[0]
    rows = tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(6))
    grads = _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)
    return (hidden.new_empty((), dtype=torch.float32), *rows, *grads)


def _forward_setup_context(ctx, inputs, output):
    # Only the loss is differentiable. Without this, autograd would hand the backward a
    # zero-filled gradient for every other output, grad_weight's V x H included.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[7:])
    ctx.needs = inputs[16:19]


@torch.library.custom_op("psft_ext::linear_scale_", mutates_args=("grad_hidden", "grad_weight",
                                                                   "grad_bias"))
def linear_scale_(grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor,
                  scale: Tensor) -> None:
    """Multiplies the three gradients by the 0-d float32 ``scale``, in place."""
    for grad in (grad_hidden, grad_weight, grad_bias):
        _scale_in_place(grad, scale)


def _scale_in_place(grad, scale):
    """``grad *= scale``, done by ``scale_rows_``, which reads the factor on the device and skips
    every row when it is exactly 1 (the usual ``loss.backward()``): the host never waits, and
    grad_weight (V x H, about a GPU millisecond per pass at V = 151936, H = 4096) is neither read
    nor written for nothing. Other layouts and dtypes fall back to ``mul_``."""
    if grad.numel() == 0:
        return
    if grad.dtype in LOGITS_DTYPES and grad.is_contiguous():
        rows = grad.view(-1, grad.shape[-1]) if grad.dim() >= 2 else grad.view(1, -1)
        ops.scale_rows_(rows, scale.expand(rows.shape[0]))
    else:
        grad.mul_(scale)


@linear_scale_.register_fake
def _(grad_hidden, grad_weight, grad_bias, scale):
    return None


def _forward_backward(ctx, grad_loss, *unused):
    # The saved gradients are those of the loss itself: scale them by the upstream scalar in
    # place, so the backward allocates nothing of the weight's size (scaling by the usual 1 is
    # exact). The scaling is an op of its own, declared as mutating, so that AOT autograd
    # functionalizes it rather than meet an in-place update of a saved tensor. A second backward
    # through the same graph (retain_graph=True) fails autograd's saved-tensor version check
    # rather than return twice-scaled gradients.
    if grad_loss is None:  # set_materialize_grads(False): the loss did not reach the output
        return (None,) * 20
    gh, gw, gb = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs
    linear_scale_(gh, gw, gb, grad_loss.float())
    return (
        gh if need_hidden else None,
        gw if need_weight else None,
        gb if need_bias else None,
    ) + (None,) * 17


linear_psft_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


@torch.library.custom_op("psft_ext::linear_psft_rows", mutates_args=())
def linear_psft_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    old_logprobs: Optional[Tensor], advantages: Optional[Tensor], advantage: float,
    clip_low: float, clip_high: float, dual_clip: float, ignore_index: int, temperature: float,
    chunk_size: int, compute_dtype: torch.dtype, accumulate_float32: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token PSFT outputs over chunks of ``hidden @ weight.T + bias`` (reduction "none"):
    (loss, logp, entropy, ratio, log_ratio, clipped, lse, coef), as ``psft_forward`` returns
    them. Differentiable in loss; its backward recomputes the chunks' logits."""
    with _no_autocast(hidden.device):
        per_token, _ = _run_forward(
            hidden, weight, bias, targets, old_logprobs, advantages, advantage, clip_low,
            clip_high, dual_clip, ignore_index, temperature, chunk_size, compute_dtype, None,
            False, False, False)
        return tuple(per_token)


@linear_psft_rows.register_fake
def _(hidden, weight, bias, targets, old_logprobs, advantages, advantage, clip_low, clip_high,
      dual_clip, ignore_index, temperature, chunk_size, compute_dtype, accumulate_float32=True):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(8))


@torch.library.custom_op("psft_ext::linear_psft_backward", mutates_args=())
def linear_psft_backward(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    lse: Tensor, coef: Tensor, ignore_index: int, temperature: float, chunk_size: int,
    compute_dtype: torch.dtype, need_hidden: bool, need_weight: bool, need_bias: bool,
    accumulate_float32: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (hidden, weight, bias; empty where not needed) of ``sum_t grad_loss[t] *
    loss[t]`` given the forward's per-token lse and coef."""
    with _no_autocast(hidden.device):
        return _run_backward(grad_loss.float().contiguous(), hidden, weight, bias, targets, lse,
                             coef, ignore_index, temperature, chunk_size, compute_dtype,
                             need_hidden, need_weight, need_bias, accumulate_float32)


@linear_psft_backward.register_fake
def _(grad_loss, hidden, weight, bias, targets, lse, coef, ignore_index, temperature, chunk_size,
      compute_dtype, need_hidden, need_weight, need_bias, accumulate_float32=True):
    return _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _rows_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable rows
    ctx.mark_non_differentiable(*output[1:])
    lse, coef = output[6], output[7]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, lse, coef)
    ctx.ignore_index, ctx.temperature = inputs[10], inputs[11]
    ctx.chunk_size, ctx.compute_dtype = inputs[12], inputs[13]
    ctx.accumulate_float32 = inputs[14] if len(inputs) > 14 else True


def _rows_backward(ctx, grad_loss, *unused):
    if grad_loss is None:  # set_materialize_grads(False): the losses did not reach the output
        return (None,) * 15
    hidden, weight, bias, targets, lse, coef = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    gh, gw, gb = linear_psft_backward(
        grad_loss, hidden, weight, bias, targets, lse, coef, ctx.ignore_index, ctx.temperature,
        ctx.chunk_size, ctx.compute_dtype, need_hidden, need_weight, need_bias and ctx.has_bias,
        ctx.accumulate_float32)
    return (
        gh if need_hidden else None,
        gw if need_weight else None,
        gb if need_bias and ctx.has_bias else None,
    ) + (None,) * 12


linear_psft_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


@torch.library.custom_op("psft_ext::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
    temperature: float, chunk_size: int, compute_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """(logp, entropy) per token over chunks of ``hidden @ weight.T + bias``; no autograd."""
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        operands = _Operands(hidden, weight, bias, compute_dtype)
        rows = _rows(hidden, weight, chunk_size)
        for start, end in _chunk_bounds(n, rows, targets != ignore_index):
            logits = _chunk_logits(operands.hidden_rows(start, end), operands.weight,
                                   operands.bias)
            logp[start:end], entropy[start:end] = ops.token_logprobs(
                logits, targets[start:end], ignore_index, temperature)
            del logits  # before the next chunk's logits exist
        return logp, entropy


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, chunk_size, compute_dtype):
    n = hidden.shape[0]
    return (hidden.new_empty((n,), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------


def _check_linear_inputs(hidden, weight, bias, targets, fn):
    """Checks the shapes, dtypes and devices; returns the dtype of the matmuls (the autocast
    dtype inside an autocast region of hidden's device type, else the inputs' dtype)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: weight {tuple(weight.shape)} does not match hidden's last dimension "
            f"{hidden.shape[-1]} (weight is (V, H), as model.get_output_embeddings().weight)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{fn}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    floats = [("hidden", hidden), ("weight", weight)]
    if bias is not None:
        floats.append(("bias", bias))
    for name, value in floats:
        if value.dtype not in LOGITS_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {value.dtype}")
    _check_targets(targets, hidden.shape[:-1], "hidden", fn)
    for name, value in floats[1:] + [("targets", targets)]:
        if value.device != hidden.device:
            raise ValueError(f"{fn}: {name} is on {value.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0 and targets.numel() > 0:
        raise ValueError(f"{fn}: weight has an empty vocabulary dimension")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for name, value in floats[1:]:
        if value.dtype != hidden.dtype:
            raise TypeError(
                f"{fn}: {name} is {value.dtype} but hidden is {hidden.dtype} (outside autocast "
                f"they must match, as for hidden @ weight.T)")
    return hidden.dtype


def _check_chunk_size(chunk_size, fn):
    """0 stands for "choose from the shapes and free memory" in the ops."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def linear_psft_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    advantages: Union[float, Tensor] = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: Optional[float] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items: Optional[Union[int, float, Tensor]] = None,
    return_metrics: bool = False,
    accumulate_float32: bool = True,
):
    """PSFT loss of the LM head's logits ``hidden @ weight.T + bias`` without materializing them.

    Same results, metrics and gradients (for hidden, weight and bias) as
    ``psft_loss(hidden @ weight.T + bias, targets, old_logprobs, ...)``; see
    :func:`psft_ext.psft_loss` for the loss and its keywords.

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, the last hidden states.
        weight: (V, H), the LM head, as ``model.get_output_embeddings().weight`` (may be tied to
            the input embeddings; autograd adds both gradients).
        targets: (...) int64 / int32 token ids.
        bias: optional (V,) bias of the LM head.
        chunk_size: rows of logits formed at a time; None chooses from the shapes and the free
            memory (:func:`auto_chunk_rows`). Peak memory beyond the inputs and their gradients:
            one chunk of logits (the kernels write its gradient over it), plus, for a bfloat16 /
            float16 weight split into several chunks, grad_weight's float32 accumulator.
        accumulate_float32: for a bfloat16 / float16 weight and several chunks, accumulate
            grad_weight across chunks in float32 (default: one rounding at the end, 2 V H
            bytes more memory) or, with False, in the weight's dtype (one rounding per chunk,
            no extra memory). No effect on float32 weights or a single chunk.

    With reduction "mean" or "sum" and an input that requires a gradient (in grad mode), the
    gradients are computed during this call (the only time a chunk's logits exist) and the
    backward just scales them: evaluate under ``torch.no_grad()`` to skip that work. With
    reduction "none", and for float16 compute whatever the reduction (a gradient formed for
    1 / num_items would flush to float16 zeros before a GradScaler's scale reaches it), the
    backward recomputes the logits chunk by chunk (four matmuls of the size of
    ``hidden @ weight.T`` in all instead of three). ``num_items``, ``old_logprobs`` and
    ``advantages`` are constants (no gradient). In bfloat16 / float16 the logits are
    ``F.linear``'s (the bias added before the one rounding).
    """
    fn = "linear_psft_loss"
    compute_dtype = _check_linear_inputs(hidden, weight, bias, targets, fn)
    _check_loss_options(fn, clip_low, clip_high, dual_clip, temperature, reduction, ignore_index)
    chunk = _check_chunk_size(chunk_size, fn)
    targets = _targets_for(targets, ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    old, adv_tensor, adv_scalar = _old_and_advantages(old_logprobs, advantages, targets, fn,
                                                      where="hidden")
    num_tokens = (flat_targets != ignore_index).sum()
    hyper = (adv_scalar, float(clip_low), float(clip_high),
             0.0 if dual_clip is None else float(dual_clip), ignore_index, float(temperature))

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    # float16 logits with a gradient to form: the per-token path, whose backward forms each
    # chunk's gradient with the actual upstream gradient (a GradScaler's scale in it) before
    # rounding it to float16, as psft_loss does for float16 logits (see there). Formed in the
    # forward for 1 / den, most of it would flush to zero. One more matmul pass (the chunk
    # logits again in the backward); bfloat16 and float32 keep the single pass.
    per_token = reduction == "none" or (compute_dtype == torch.float16 and any(needs))
    if per_token:
        loss, logp, entropy, ratio, log_ratio, clipped, _, _ = linear_psft_rows(
            flat_hidden, weight, bias, flat_targets, old, adv_tensor, *hyper, chunk,
            compute_dtype, bool(accumulate_float32))
        out = _reduce_in_python(loss, targets.shape, reduction, num_items, num_tokens, fn)
    else:
        den_tensor, den_value = None, 1.0
        if reduction == "mean":
            den = _mean_denominator(num_items, num_tokens, hidden.device, fn)
            if isinstance(den, torch.Tensor):
                den_tensor = den.detach().to(torch.float32)
            else:
                den_value = den
        out, _, logp, entropy, ratio, log_ratio, clipped, _, _, _ = linear_psft_forward(
            flat_hidden, weight, bias, flat_targets, old, adv_tensor, *hyper, den_tensor,
            den_value, chunk, compute_dtype, *needs, bool(accumulate_float32))
    if not return_metrics:
        return out
    return out, _metrics(logp, entropy, clipped, log_ratio, ratio, num_tokens)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without materializing the logits.

    float32 log-probs of the targets (0 where ignored), of targets' shape; with
    ``with_entropy=True`` also the per-token entropy. No autograd (meant for the old policy).
    """
    fn = "linear_token_logprobs"
    compute_dtype = _check_linear_inputs(hidden, weight, bias, targets, fn)
    _check_finite("temperature", temperature, fn, low=0.0)
    _check_ignore_index(ignore_index, fn)
    chunk = _check_chunk_size(chunk_size, fn)
    targets = _targets_for(targets, ignore_index)
    logp, entropy = linear_token_logprobs_op(
        hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
        None if bias is None else bias.detach(), targets.reshape(-1), ignore_index,
        float(temperature), chunk, compute_dtype)
    logp = logp.view(targets.shape)
    if with_entropy:
        return logp, entropy.view(targets.shape)
    return logp
