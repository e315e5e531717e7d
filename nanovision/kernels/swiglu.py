"""Gated / squared activations: SwiGLU (silu(gate) * up) and ReLU^2 (relu(x) ** 2).

Triton elementwise kernels (large 1D blocks, fp32 math), autograd Functions that
recompute the activation in backward instead of saving it, and plain-torch
references. Forward rounding reproduces eager bf16/fp16 semantics
(activation rounded to the input dtype before the product).

`swiglu_linear` / `relu2_linear` also apply the MLP's down projection, so that
the activation h is not kept for the weight gradient either: backward rebuilds
it from gate/up in the same kernel pass that computes dgate/dup.
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


def swiglu_linear_reference(gate, up, weight, bias=None):
    return F.linear(swiglu_reference(gate, up), weight, bias)


def relu2_linear_reference(x, weight, bias=None):
    return F.linear(relu2_reference(x), weight, bias)


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

    # The backward kernels can also store the forward output again into Y (STORE_Y), rounded exactly as the forward
    # kernel rounds it: the fused down projection needs it for its weight gradient and does not keep it.
    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, Y, n_elements, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
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
        if STORE_Y:
            act = silu.to(Y.dtype.element_ty).to(tl.float32)
            tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu2_fwd_kernel(X, Y, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.maximum(x, 0.0)
        tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu2_bwd_kernel(DY, X, DX, Y, n_elements, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.maximum(x, 0.0)
        dx = 2.0 * r * dy
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_Y:
            tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)


# tuning knobs
BLOCK_SIZE = 4096
NUM_WARPS = 8


def _launch(kernel, n, *args, **meta):
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    kernel[grid](*args, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS, **meta)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _act_forward(g, u, dtype):
    """swiglu(g, u), or relu2(u) when g is None, for dense same-shape inputs."""
    y = torch.empty(u.shape, dtype=dtype, device=u.device)
    if g is None:
        _launch(_relu2_fwd_kernel, y.numel(), u, y)
    else:
        _launch(_swiglu_fwd_kernel, y.numel(), g, u, y)
    return y


def _act_backward(dy, g, u, y=None, reuse_dy=False):
    """(dg or None, du) for dense dy / g / u; when `y` is given, the forward output is stored into it too.

    reuse_dy: dy is the caller's own temporary, so the first gradient (dg, or relu2's du) may overwrite it where the
    dtypes match: one buffer fewer at the backward's peak. Safe because each program reads its block of dy before
    writing the same block."""
    first = u if g is None else g
    reuse = reuse_dy and dy.dtype == first.dtype
    du = dy if reuse and g is None else torch.empty_like(u)
    dg = None if g is None else (dy if reuse else torch.empty_like(g))
    store = y is not None
    if g is None:
        _launch(_relu2_bwd_kernel, u.numel(), dy, u, du, y if store else du, STORE_Y=store)
    else:
        _launch(_swiglu_bwd_kernel, u.numel(), dy, g, u, dg, du, y if store else du, STORE_Y=store)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        out_shape = torch.broadcast_shapes(gate.shape, up.shape)
        dtype = torch.promote_types(gate.dtype, up.dtype)
        g = _dense(gate.expand(out_shape))
        u = _dense(up.expand(out_shape))
        y = _act_forward(g, u, dtype)
        ctx.save_for_backward(g, u)
        ctx.shapes = (gate.shape, up.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = _act_backward(_dense(dy), g, u)
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
        y = _act_forward(None, x, x.dtype)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _act_backward(_dense(dy), None, x)[1]


class ActLinearFunction(torch.autograd.Function):
    """F.linear(act, weight, bias) with act = swiglu(gate, up), or relu2(up) when gate is None.

    Saves gate/up and the weight but not act (B*T*intermediate): backward recomputes act from gate/up in the kernel
    that computes dgate/dup, bit-identical to the forward one, then uses it for the weight gradient. weight and bias
    must already be in act's dtype: under autocast the caller casts them, so that autograd's cast turns this
    Function's low-precision weight gradient into the fp32 master one (as an autocast linear would).
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        if gate is not None and gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        dtype = up.dtype if gate is None else torch.promote_types(gate.dtype, up.dtype)
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            raise TypeError(f"weight/bias must be in the activation dtype {dtype} (cast them first under autocast)")
        g = None if gate is None else _dense(gate)
        u = _dense(up)
        # The dtypes given are the compute dtypes: an enclosing autocast must not recast them (here, or in a backward
        # that runs on the autocast thread, as CPU backward does), or the gradients would not match the forward.
        with torch.autocast(u.device.type, enabled=False):
            out = F.linear(_act_forward(g, u, dtype), weight, bias)
        ctx.save_for_backward(g, u, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g, u, weight = ctx.saved_tensors
        # act is rebuilt only when the weight gradient needs it; dgate/dup come from the same pass either way
        act = torch.empty(u.shape, dtype=weight.dtype, device=u.device) if ctx.needs_input_grad[2] else None
        with torch.autocast(u.device.type, enabled=False):
            # dh = grad_out @ W is a fresh temporary: the kernel writes dgate over it, so that this backward's peak
            # (gate, up, dh, act, dup) is no higher than the unfused one's (gate, up, dh, dgate, dup)
            dg, du = _act_backward(_dense(grad_out.matmul(weight)), g, u, act, reuse_dy=True)
            go = grad_out.reshape(-1, grad_out.shape[-1])  # tokens flattened: [N, out]
            dw = go.t().mm(act.reshape(-1, act.shape[-1])) if act is not None else None
            db = go.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dg, du, dw, db


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Triton)."""
    return SwiGLUFunction.apply(gate, up)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 (Triton)."""
    return ReLU2Function.apply(x)


def swiglu_linear(gate, up, weight, bias=None):
    """F.linear(silu(gate) * up, weight, bias) (Triton activation) without saving the activation for backward."""
    return ActLinearFunction.apply(gate, up, weight, bias)


def relu2_linear(x, weight, bias=None):
    """F.linear(relu(x) ** 2, weight, bias) (Triton activation) without saving the activation for backward."""
    return ActLinearFunction.apply(None, x, weight, bias)
