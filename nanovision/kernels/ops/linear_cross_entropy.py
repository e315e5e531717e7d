"""Fused linear + cross-entropy (chunked over tokens, never materialises [N, V] logits).

For each chunk of tokens:
    logits = hidden_chunk @ W.T                         (input dtype, fp32 accumulate)
    [optional] logits = softcap * tanh(logits / softcap)
    loss_i = logsumexp(logits_i) - logits_i[label_i]     (fp32, Triton)
    dlogits = (softmax - onehot) * scale * dsoftcap      (Triton, written in place)
    grad_hidden[chunk] = dlogits @ W ; grad_W += dlogits.T @ hidden_chunk (fp32)

For reduction "mean"/"sum" the gradients are computed in the forward pass and the
backward only multiplies them by grad_output (grad_W is kept in fp32 until then, so
that multiply and the cast to the weight dtype are one fp32 pass). For reduction "none" the
per-token upstream gradient is only known in backward, so backward recomputes
the chunks (same memory bound, one extra matmul per chunk).
"""

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# --------------------------------------------------------------------------- #
# Reference (unfused)
# --------------------------------------------------------------------------- #
def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    logits = (hidden @ lm_head_weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if reduction == "mean" and num_items_in_batch is not None:
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # overflow-safe: exp -> inf gives 1, exp -> 0 gives -1
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _ce_chunk_kernel(
        LOGITS, stride_row,
        LABELS,
        LOSS,
        SCALE, stride_scale,
        n_cols, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: loss_i and (optionally) d loss / d logits in place."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        label = tl.load(LABELS + row).to(tl.int64)
        cols0 = tl.arange(0, BLOCK_V)

        if label != ignore_index:
            # pass 1: online max / sum-exp over the vocabulary
            m = -float("inf")
            d = 0.0
            for start in range(0, n_cols, BLOCK_V):
                cols = start + cols0
                mask = cols < n_cols
                z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z = tl.where(mask, z, -float("inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)

            # an out-of-range label yields a NaN loss instead of an out-of-bounds read
            in_range = (label >= 0) & (label < n_cols)
            zt = tl.load(ptr + tl.where(in_range, label, 0), mask=in_range, other=float("nan")).to(tl.float32)
            if HAS_SOFTCAP:
                zt = softcap * _tanh(zt / softcap)
            tl.store(LOSS + row, lse - zt)

            if COMPUTE_GRAD:
                scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
                # pass 2: (softmax - onehot) * scale [* dsoftcap], in place
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + cols0
                    mask = cols < n_cols
                    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        th = _tanh(x / softcap)
                        z = softcap * th
                    else:
                        z = x
                    g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                    g = g * scale
                    if HAS_SOFTCAP:
                        g = g * (1.0 - th * th)
                    tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)
        else:
            tl.store(LOSS + row, 0.0)
            if COMPUTE_GRAD:
                zeros = tl.zeros((BLOCK_V,), dtype=LOGITS.dtype.element_ty)
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + cols0
                    tl.store(ptr + cols, zeros, mask=cols < n_cols)


# --------------------------------------------------------------------------- #
# Host side
# --------------------------------------------------------------------------- #
MAX_BLOCK_V = 4096
_ADDMM_OUT_DTYPE_OK = {}


CHUNK_MULTIPLIER = 8


def _default_chunk_size(n_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: the logits chunk is about CHUNK_MULTIPLIER x the hidden states' size.

    Fewer chunks mean fewer passes over the fp32 grad_W accumulator (2 x V x H x 4 bytes each), at the cost of a
    larger logits buffer; at nanochat's d20 shape this gives 4096-row chunks, the trade-off measured in
    benchmarks/RESULTS.md.
    """
    per = -(-vocab // max(1, hidden))
    c = max(1, -(-n_rows // per))
    c = (1 << (c - 1).bit_length()) * CHUNK_MULTIPLIER
    return max(1, min(n_rows, max(c, 256)))


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32 [V, H]) += g.T @ h with g, h in the input dtype and fp32 accumulation."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
        return
    dev = acc.device.type
    if dev == "cuda" and _ADDMM_OUT_DTYPE_OK.get(dev, True):
        try:
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE_OK[dev] = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE_OK[dev] = False
    acc.addmm_(g.t().float(), h.float())


def _chunk_pass(hidden, weight, labels, loss_rows, scale, scale_stride, ignore_index, softcap,
                chunk_size, compute_grad, grad_hidden, grad_w_acc):
    # the chunks run in the dtypes chosen by the caller: an enclosing autocast must not recast the matmuls
    with torch.autocast(hidden.device.type, enabled=False):
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
        num_warps = 8 if block_v >= 2048 else 4
        logits_buf = torch.empty((min(chunk_size, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h_c = hidden[start:end]
            logits = logits_buf[: end - start]
            torch.mm(h_c, weight.t(), out=logits)
            sc = scale[start:end] if scale_stride else scale
            _ce_chunk_kernel[(end - start,)](
                logits, logits.stride(0),
                labels[start:end],
                loss_rows[start:end],
                sc, scale_stride,
                vocab, ignore_index, float(softcap) if softcap is not None else 1.0,
                HAS_SOFTCAP=softcap is not None,
                COMPUTE_GRAD=compute_grad,
                BLOCK_V=block_v,
                num_warps=num_warps,
            )
            if compute_grad:
                if grad_hidden is not None:
                    torch.mm(logits, weight, out=grad_hidden[start:end])
                if grad_w_acc is not None:
                    _accumulate_grad_weight(grad_w_acc, logits, h_c)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, softcap, denom,
                need_grad_hidden, need_grad_weight, chunk_size):
        in_shape = hidden.shape
        h = hidden.reshape(-1, in_shape[-1])
        if not h.is_contiguous():
            h = h.contiguous()
        w = weight if weight.is_contiguous() else weight.contiguous()
        y = labels.reshape(-1)
        if not y.is_contiguous():
            y = y.contiguous()
        n_rows, hdim = h.shape
        vocab = w.shape[0]
        if y.shape[0] != n_rows:
            raise ValueError(f"labels ({y.shape[0]}) and hidden rows ({n_rows}) disagree")
        if chunk_size is None:
            chunk_size = _default_chunk_size(n_rows, vocab, hdim)
        device = h.device
        loss_rows = torch.empty((n_rows,), dtype=torch.float32, device=device)

        ones = torch.ones((1,), dtype=torch.float32, device=device)
        if reduction == "mean":
            if denom is None:
                denom = (y != ignore_index).sum().to(torch.float32)
            scale = (1.0 / denom).reshape(1)
        else:
            scale = ones
        # fp16 cannot hold (softmax - onehot) / n_tokens (it underflows for large batches), so
        # for fp16 the kernel writes unscaled logit gradients and the mean's 1/n is applied
        # to the fp32 grad_W accumulator and to grad_hidden in backward instead
        defer_scale = reduction == "mean" and h.dtype == torch.float16

        grads_now = reduction != "none" and (need_grad_hidden or need_grad_weight)
        grad_hidden = grad_w_acc = None
        if grads_now:
            if need_grad_hidden:
                grad_hidden = torch.empty_like(h)
            if need_grad_weight:
                grad_w_acc = torch.zeros(w.shape, dtype=torch.float32, device=device)

        if n_rows > 0:
            _chunk_pass(h, w, y, loss_rows, ones if defer_scale else scale, 0, ignore_index, softcap,
                        chunk_size, grads_now, grad_hidden, grad_w_acc)

        if reduction == "none":
            loss = loss_rows
            ctx.save_for_backward(h, w, y)
        else:
            loss = loss_rows.sum()
            if reduction == "mean":
                loss = loss * scale[0]
            # kept until backward: grad_W stays fp32 so that the grad_output multiply and the
            # cast to the weight dtype happen in one fp32 pass
            ctx.grad_hidden = grad_hidden.view(in_shape) if grad_hidden is not None else None
            ctx.grad_w_acc = grad_w_acc
            ctx.deferred_scale = scale if defer_scale else None
        ctx.w_dtype = weight.dtype
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.softcap = softcap
        ctx.chunk_size = chunk_size
        ctx.in_shape = in_shape
        ctx.needs = (need_grad_hidden, need_grad_weight)
        ctx.consumed = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        need_h, need_w = ctx.needs
        if ctx.reduction == "none":
            h, w, y = ctx.saved_tensors
            g = grad_output.reshape(-1).to(torch.float32).contiguous()
            grad_hidden = torch.empty_like(h) if need_h else None
            grad_w_acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            loss_rows = torch.empty((h.shape[0],), dtype=torch.float32, device=h.device)
            if h.shape[0] > 0 and (need_h or need_w):
                _chunk_pass(h, w, y, loss_rows, g, 1, ctx.ignore_index, ctx.softcap, ctx.chunk_size,
                            True, grad_hidden, grad_w_acc)
            gh = grad_hidden.view(ctx.in_shape) if grad_hidden is not None else None
            gw = grad_w_acc.to(w.dtype) if grad_w_acc is not None else None
            return gh, gw, None, None, None, None, None, None, None, None

        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward can run only once per forward "
                "(gradients are precomputed in forward and scaled in place)"
            )
        ctx.consumed = True
        gh, acc = ctx.grad_hidden, ctx.grad_w_acc
        ctx.grad_hidden = ctx.grad_w_acc = None
        factor = grad_output.reshape(1).to(torch.float32)
        if ctx.deferred_scale is not None:
            factor = factor * ctx.deferred_scale
        if gh is not None:
            gh.mul_(factor)
        gw = None
        if acc is not None:
            if ctx.w_dtype == torch.float32:
                gw = acc.mul_(factor)
            else:
                gw = torch.empty(acc.shape, dtype=ctx.w_dtype, device=acc.device)
                torch.mul(acc, factor, out=gw)
            del acc
        return gh, gw, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    num_items_in_batch=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ lm_head_weight.T` against `labels` without full logits.

    hidden [..., H], lm_head_weight [V, H], labels [...] aligned with hidden (no shift).
    reduction: "mean" (over non-ignored labels, or sum / num_items_in_batch when given),
    "sum" or "none" (per-token fp32 losses, 0 where ignored). Returns fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        dt = torch.get_autocast_dtype(dev_type)
        hidden, lm_head_weight = hidden.to(dt), lm_head_weight.to(dt)
    elif hidden.dtype != lm_head_weight.dtype:
        dt = torch.promote_types(hidden.dtype, lm_head_weight.dtype)
        hidden, lm_head_weight = hidden.to(dt), lm_head_weight.to(dt)
    denom = None
    if reduction == "mean" and num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32).reshape(())
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and lm_head_weight.requires_grad
    return FusedLinearCrossEntropyFunction.apply(
        hidden, lm_head_weight, labels, int(ignore_index), reduction,
        None if softcap is None else float(softcap), denom, need_h, need_w, chunk_size,
    )
