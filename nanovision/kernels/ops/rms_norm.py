"""RMSNorm and LayerNorm: Triton kernels, autograd and plain-torch references.

RMSNorm, eager semantics (the model's definition), with s = x (+ residual):

    y = (s.float() * rsqrt(mean(s.float() ** 2, -1) + eps)).to(s.dtype)
    y = y * weight            # only when weight is not None, in the input dtype

The kernels reproduce the double rounding exactly (normalise in fp32, round to
the input dtype, multiply by the weight, round again) and accumulate in fp32.

LayerNorm is the same kernels with the row's mean subtracted first and a bias, computed in fp32 and rounded once, as
torch's layer_norm: y = (s - mean(s)) * rsqrt(var(s) + eps) * weight + bias (the vision tower's norms).
"""

from typing import Optional, Tuple, Union

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from .launch import unused_pointer, wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #
def rms_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    s = x if residual is None else x + residual
    y = (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    if weight is not None:
        y = y * weight
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y if residual is None else (y, s)


def layer_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    s = x if residual is None else x + residual
    compute_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    y_dtype = s.dtype if weight is None else torch.promote_types(s.dtype, weight.dtype)
    y = torch.nn.functional.layer_norm(
        s.to(compute_dtype), s.shape[-1:], None if weight is None else weight.to(compute_dtype),
        None if bias is None else bias.to(compute_dtype), eps,
    ).to(out_dtype or y_dtype)
    return y if residual is None else (y, s)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
# A norm that keeps its narrow output y = n * w for the backward rebuilds n as y / w, undefined where w == 0 (or
# subnormal, which kernels may flush to zero). Asking whether a weight has such an entry needs a host-device sync
# every step, so such norms use WEIGHT_FLOOR for entries smaller than it in magnitude:
# the output there is n * 2^-64 instead of 0, below any rounding of the projection that reads it, and n is rebuilt to
# y's precision. Only outputs with the input's exponent range take this path (bf16 from fp32): in fp16, n * 2^-64
# underflows, so fp16 outputs keep s.
WEIGHT_FLOOR = 2.0**-64

if HAS_TRITON:
    _WEIGHT_FLOOR = tl.constexpr(WEIGHT_FLOOR)

    @triton.jit
    def _norm_fwd_kernel(
        X, stride_x,
        R, stride_r,
        S, stride_s,
        W, B,
        Y, stride_y,
        RSTD,
        n_rows, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        CENTER: tl.constexpr,
        FLOOR_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # one program normalises BLOCK_M rows; BLOCK_N >= n_cols covers a whole row
        # FLOOR_WEIGHT: weights below WEIGHT_FLOOR in magnitude count as WEIGHT_FLOOR (see there)
        # CENTER: LayerNorm (the mean subtracted, one rounding at the end; HAS_BIAS only here), else RMSNorm
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            # round the sum to the stream dtype exactly like eager `x + residual`
            s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
            sf = s.to(tl.float32)
        else:
            sf = x.to(tl.float32)

        if CENTER:
            mean = tl.sum(sf, axis=1) / n_cols
            sf = tl.where(mask, sf - mean[:, None], 0.0)
        mean_sq = tl.sum(sf * sf, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(mean_sq + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)

        y = sf * rstd[:, None]
        if not CENTER:
            y = y.to(S.dtype.element_ty)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            if FLOOR_WEIGHT:
                w = tl.where(tl.abs(w) < _WEIGHT_FLOOR, _WEIGHT_FLOOR, w)
            y = y.to(tl.float32) * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_bwd_kernel(
        DY, stride_dy,
        S, stride_s,
        DSO, stride_dso,
        W,
        RSTD,
        DX, stride_dx,
        DX2, stride_dx2,
        DW_PART, DB_PART,
        n_rows, n_cols, rows_per_prog,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        CENTER: tl.constexpr,
        HAS_DS_OUT: tl.constexpr,
        HAS_DX2: tl.constexpr,
        FROM_OUTPUT: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # each program walks `rows_per_prog` consecutive rows (one row per step) and
        # writes one fp32 partial sum of the weight (and bias) gradient; the host sums the partials.
        # S: the norm's input s, or with FROM_OUTPUT its output y = n * w (n = s * rstd), stored in a dtype
        # narrower than s's, so n is y / w to y's precision (w floored as the forward floored it)
        # DX2: the same gradient again in another dtype (an input narrower than s: the branch added to the stream)
        pid = tl.program_id(0).to(tl.int64)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, n_rows)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32)  # 1: y / w stays finite off the row
            if FROM_OUTPUT:
                w = tl.where(tl.abs(w) < _WEIGHT_FLOOR, _WEIGHT_FLOOR, w)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

        for row in range(row_start, row_end):
            s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)

            if FROM_OUTPUT:
                n = s
                if HAS_WEIGHT:
                    n = s / w
                n_rounded = n  # s is wider than y (fp32 under autocast): rounding n to it changes nothing
            elif CENTER:
                # the mean is recomputed from the row already loaded rather than kept from the forward
                n = tl.where(mask, s - tl.sum(s, axis=0) / n_cols, 0.0) * rstd
                n_rounded = n  # LayerNorm rounds only its output
            else:
                n = s * rstd
                n_rounded = n.to(S.dtype.element_ty).to(tl.float32)
            if HAS_WEIGHT:
                # y = round(n) * w  ->  dW = sum(dy * round(n)), dn = dy * w
                dw_acc += dy * n_rounded
                dn = dy * w
            else:
                dn = dy
            if HAS_BIAS:
                db_acc += dy
            c = tl.sum(dn * n, axis=0) / n_cols
            if CENTER:
                ds = (dn - n * c - tl.sum(dn, axis=0) / n_cols) * rstd
            else:
                ds = (dn - n * c) * rstd
            if HAS_DS_OUT:
                ds += tl.load(DSO + row * stride_dso + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, ds.to(DX.dtype.element_ty), mask=mask)
            if HAS_DX2:
                tl.store(DX2 + row * stride_dx2 + cols, ds.to(DX2.dtype.element_ty), mask=mask)

        if HAS_WEIGHT:
            tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PART + pid * n_cols + cols, db_acc, mask=mask)


# --------------------------------------------------------------------------- #
# Launch helpers
# --------------------------------------------------------------------------- #
_SM_COUNT = {}

# tuning knobs (tuned on H100, bf16): forward tile = elements per program
# (several rows per program when the hidden size is small), elements per thread
FWD_TILE = 2048
FWD_ELEMS_PER_THREAD = 8


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """2D [rows, n_cols] view with unit column stride (copies only if needed)."""
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1 and n_cols > 1:
        t2 = t2.contiguous()
    return t2


def _narrower_same_range(out_dtype: torch.dtype, s_dtype: torch.dtype) -> bool:
    out, s = torch.finfo(out_dtype), torch.finfo(s_dtype)
    return out.bits < s.bits and out.tiny == s.tiny


def _fwd_config(n_cols: int):
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(64, FWD_TILE // block_n))
    num_warps = max(1, min(16, (block_m * block_n) // (32 * FWD_ELEMS_PER_THREAD)))
    return block_m, block_n, num_warps


def _bwd_config(n_cols: int):
    """(BLOCK_N, num_warps, programs per SM) for the row-looping backward kernel (H100-tuned)."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n <= 256:
        return block_n, 1, 16
    if block_n <= 512:
        return block_n, 2, 16
    if block_n <= 1024:
        return block_n, 4, 8
    if block_n <= 4096:
        return block_n, 8, 4
    if block_n <= 8192:
        return block_n, 4, 2
    return block_n, min(16, block_n // 2048), 2


if HAS_TRITON:
    # The kernels run as torch.library ops: torch.compile traces through them (no graph break), fuses the elementwise
    # ops around them and launches them from its generated code; an eager call runs the same function.
    @triton_op("nanovision::norm", mutates_args=())
    def _norm_op(
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        eps: float,
        out_dtype: Optional[torch.dtype],
        keep_output: bool,
        center: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, s, rstd) with s = x + residual (empty without a residual: an op's output may not alias its input).
        center: LayerNorm, else RMSNorm (no bias). keep_output: the backward keeps y instead of s (read by the
        autograd context), so the weight is floored (RMSNorm only)."""
        n_cols = x.shape[-1]
        x2 = _as_rows(x, n_cols)
        n_rows = x2.shape[0]
        if residual is not None:
            s_dtype = torch.promote_types(x.dtype, residual.dtype)
            r2 = _as_rows(residual.expand_as(x), n_cols)
            s2 = torch.empty((n_rows, n_cols), dtype=s_dtype, device=x.device)
        else:
            s_dtype = x.dtype
            r2 = s2 = unused_pointer(x2).view(1, 1)
        y_dtype = s_dtype if weight is None else torch.promote_types(s_dtype, weight.dtype)
        y2 = torch.empty((n_rows, n_cols), dtype=out_dtype or y_dtype, device=x.device)
        rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        if n_rows > 0:
            block_m, block_n, num_warps = _fwd_config(n_cols)
            wrap_triton(_norm_fwd_kernel)[(triton.cdiv(n_rows, block_m),)](
                x2, x2.stride(0),
                r2, r2.stride(0),
                s2, s2.stride(0),
                weight.contiguous() if weight is not None else unused_pointer(x2),
                bias.contiguous() if bias is not None else unused_pointer(x2),
                y2, y2.stride(0),
                rstd,
                n_rows, n_cols, eps,
                HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                CENTER=center,
                FLOOR_WEIGHT=keep_output,
                BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps,
            )
        return y2.view(x.shape), (s2.view(x.shape) if residual is not None else x.new_empty(0)), rstd


    @triton_op("nanovision::norm_backward", mutates_args=())
    def _norm_backward_op(
        dy: torch.Tensor,
        saved: torch.Tensor,
        ds_out: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        rstd: torch.Tensor,
        s_dtype: torch.dtype,
        second_dtype: Optional[torch.dtype],
        from_output: bool,
        center: bool,
        has_bias: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ds [rows, cols], ds in second_dtype, dw, db; each but ds empty without its dtype or parameter); saved:
        the norm's input s, or with from_output its output y."""
        n_cols = saved.shape[-1]
        s2 = _as_rows(saved, n_cols)
        n_rows = s2.shape[0]
        device = s2.device
        dy2 = _as_rows(dy, n_cols)
        dso2 = _as_rows(ds_out, n_cols) if ds_out is not None else unused_pointer(dy2).view(1, 1)
        ds = torch.empty((n_rows, n_cols), dtype=s_dtype, device=device)
        ds2 = ds.new_empty((n_rows, n_cols) if second_dtype is not None else 0, dtype=second_dtype or s_dtype)
        if n_rows == 0:  # no rows: zero parameter gradients
            dw = dy.new_empty(0) if weight is None else torch.zeros_like(weight)
            db = dy.new_zeros(n_cols, dtype=torch.float32) if has_bias else dy.new_empty(0)
        else:
            block_n, num_warps, progs_per_sm = _bwd_config(n_cols)
            rows_per_prog = triton.cdiv(n_rows, min(n_rows, _sm_count(device) * progs_per_sm))
            n_prog = triton.cdiv(n_rows, rows_per_prog)

            def partials(wanted):
                return (torch.empty((n_prog, n_cols), dtype=torch.float32, device=device) if wanted
                        else unused_pointer(rstd))

            dw_part, db_part = partials(weight is not None), partials(has_bias)
            wrap_triton(_norm_bwd_kernel)[(n_prog,)](
                dy2, dy2.stride(0),
                s2, s2.stride(0),
                dso2, dso2.stride(0),
                weight.contiguous() if weight is not None else unused_pointer(s2),
                rstd,
                ds, ds.stride(0),
                ds2 if second_dtype is not None else unused_pointer(ds).view(1, 1), ds2.stride(0),
                dw_part, db_part,
                n_rows, n_cols, rows_per_prog,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=has_bias,
                CENTER=center,
                HAS_DS_OUT=ds_out is not None,
                HAS_DX2=second_dtype is not None,
                FROM_OUTPUT=from_output,
                BLOCK_N=block_n,
                num_warps=num_warps,
            )
            dw = dw_part.sum(0).to(weight.dtype) if weight is not None else dy.new_empty(0)
            db = db_part.sum(0) if has_bias else dy.new_empty(0)
        return ds, ds2, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _, _, keep_output, center = inputs
    y, s, rstd = output
    # An output narrower than s (autocast_output: bf16 y for the projections, which keep that same tensor for their
    # weight gradients) is kept instead of s: the backward rebuilds n from it, to the projections' precision.
    ctx.save_for_backward(y if keep_output else (s if residual is not None else x), weight, rstd)
    ctx.keep_output, ctx.center = keep_output, center
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.s_dtype = s.dtype if residual is not None else x.dtype
    ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
    ctx.r_dtype, ctx.r_shape = (residual.dtype, residual.shape) if residual is not None else (None, None)


def _backward(ctx, dy, ds_out, _):
    saved, weight, rstd = ctx.saved_tensors
    has_residual, has_bias = ctx.r_shape is not None, ctx.bias_dtype is not None
    # x's and the residual's gradient is ds in their own dtypes; the kernel also writes it in the one that differs
    # from s's (the branch output added to an fp32 stream under autocast) instead of a cast reading ds again
    second_dtype = next((d for d in (ctx.x_dtype, ctx.r_dtype) if d is not None and d != ctx.s_dtype), None)
    ds, ds2, dw, db = _norm_backward_op(dy, saved, ds_out if has_residual else None, weight, rstd, ctx.s_dtype,
                                        second_dtype, ctx.keep_output, ctx.center, has_bias)

    def grad_as(dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        grad = (ds2 if dtype == second_dtype else ds.to(dtype)).view(ctx.x_shape)
        return grad if shape == ctx.x_shape else grad.sum_to_size(shape)  # a broadcast residual

    dres = grad_as(ctx.r_dtype, ctx.r_shape) if has_residual else None
    return (grad_as(ctx.x_dtype, ctx.x_shape), dw if weight is not None else None,
            db.to(ctx.bias_dtype) if has_bias else None, dres, None, None, None, None)


if HAS_TRITON:
    _norm_op.register_autograd(_backward, setup_context=_setup_context)


def _check_parameters(op: str, x: torch.Tensor, **parameters: Optional[torch.Tensor]) -> None:
    """The kernels read one weight / bias entry per column: anything but a vector of the row's length would be read
    out of bounds."""
    for name, p in parameters.items():
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{op}: {name} must have shape ({x.shape[-1]},) for rows of {x.shape[-1]}; got "
                             f"{tuple(p.shape)}")


def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Triton RMSNorm over the last dim. With `residual`, returns (norm(x + residual), x + residual). `out_dtype`:
    write the normalised output in this dtype (computed in fp32, rounded once) instead of the inputs' dtype.

    An output narrower than s but with its exponent range (bf16 from fp32) is kept for the backward instead of s, and
    the weight floored at WEIGHT_FLOOR for it."""
    _check_parameters("rms_norm", x, weight=weight)
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    keep_output = out_dtype is not None and _narrower_same_range(out_dtype, s_dtype)
    y, s, _ = _norm_op(x, weight, None, residual, float(eps), out_dtype, keep_output, False)
    return y if residual is None else (y, s)


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Triton LayerNorm over the last dim (computed in fp32, rounded once). With `residual`, returns
    (norm(x + residual), x + residual). `out_dtype`: write the normalised output in this dtype instead of the inputs'
    dtype. The backward keeps s (the norm's input)."""
    _check_parameters("layer_norm", x, weight=weight, bias=bias)
    y, s, _ = _norm_op(x, weight, bias, residual, float(eps), out_dtype, False, True)
    return y if residual is None else (y, s)
