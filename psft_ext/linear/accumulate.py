"""The matmuls of the fused linear loss: a chunk's logits, and the gradients of hidden, weight and
bias accumulated over the chunks' logit gradients.

Peak memory above the inputs: grad_hidden, grad_weight and one chunk of logits. With bfloat16 /
float16 weights and more than one chunk, grad_weight is by default accumulated across chunks in
float32 (``accumulate_float32=True``): 2 V H bytes of float32 instead of the V H of the result,
held as two halves of the vocabulary so that the final cast narrows them into the first half's
own memory (no third buffer at the end). ``accumulate_float32=False`` accumulates in the weight's
dtype instead (each chunk's product, computed in float32 inside the matmul, is rounded into the
running sum once): the peak is then the gradients and one chunk, at the price of one rounding per
chunk.
"""

import torch


def chunk_logits(h, weight, bias):
    """One chunk of logits, ``h @ weight.T + bias``, in the dtype of its operands."""
    if bias is None:
        return torch.mm(h, weight.t())
    return torch.addmm(bias, h, weight.t())


class Operands:
    """hidden, weight and bias as the matmuls use them: cast once to the compute dtype (the
    autocast dtype, or the inputs' own), as autocast would cast them for ``F.linear``."""

    def __init__(self, hidden, weight, bias, compute_dtype):
        self.hidden = hidden
        self.weight = weight.to(compute_dtype).contiguous()
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.dtype = compute_dtype

    def hidden_rows(self, start, end):
        return self.hidden[start:end].to(self.dtype)


class GradAccumulator:
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
                accumulate_mm(part, g.t()[rows:rows + part.shape[0]], h, overwrite=first)
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
            gw = narrow_halves(*self.gw, self.weight_dtype)
        else:
            gw = self.gw[0].to(self.weight_dtype)
        self.gw = None
        gb = (self.gb.to(self.bias_dtype) if self.gb is not None
              else (weight if bias is None else bias).new_empty(0))
        return gh, gw, gb


def narrow_halves(top, bottom, dtype):
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


def accumulate_mm(acc, a, b, overwrite):
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
