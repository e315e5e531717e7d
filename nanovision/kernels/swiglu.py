"""Gated / squared activations: SwiGLU (silu(gate) * up) and ReLU^2 (relu(x) ** 2).

Triton elementwise kernels (large 1D blocks, fp32 math), autograd Functions that
recompute the activation in backward instead of saving it, and plain-torch
references. Forward rounding reproduces eager bf16/fp16 semantics
(activation rounded to the input dtype before the product).
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# --------------------------------------------------------------------------- #
# References
# --------------------------------------------------------------------------- #
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        du = dy * silu
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu2_fwd_kernel(X, Y, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.maximum(x, 0.0)
        tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu2_bwd_kernel(DY, X, DX, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dx = 2.0 * tl.maximum(x, 0.0) * dy
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# tuning knobs
BLOCK_SIZE = 4096
NUM_WARPS = 8


def _launch(kernel, n, *args):
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    kernel[grid](*args, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        out_shape = torch.broadcast_shapes(gate.shape, up.shape)
        dtype = torch.promote_types(gate.dtype, up.dtype)
        g = _dense(gate.expand(out_shape))
        u = _dense(up.expand(out_shape))
        y = torch.empty(out_shape, dtype=dtype, device=gate.device)
        _launch(_swiglu_fwd_kernel, y.numel(), g, u, y)
        ctx.save_for_backward(g, u)
        ctx.shapes = (gate.shape, up.shape)
        ctx.dtypes = (gate.dtype, up.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = _dense(dy)
        dg = torch.empty(g.shape, dtype=ctx.dtypes[0], device=g.device)
        du = torch.empty(u.shape, dtype=ctx.dtypes[1], device=u.device)
        _launch(_swiglu_bwd_kernel, dy.numel(), dy, g, u, dg, du)
        g_shape, u_shape = ctx.shapes
        if dg.shape != g_shape:
            dg = dg.sum_to_size(g_shape)
        if du.shape != u_shape:
            du = du.sum_to_size(u_shape)
        return dg, du


class ReLU2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        y = torch.empty_like(x)
        _launch(_relu2_fwd_kernel, x.numel(), x, y)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = _dense(dy)
        dx = torch.empty_like(x)
        _launch(_relu2_bwd_kernel, x.numel(), dy, x, dx)
        return dx


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Triton)."""
    return SwiGLUFunction.apply(gate, up)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 (Triton)."""
    return ReLU2Function.apply(x)
