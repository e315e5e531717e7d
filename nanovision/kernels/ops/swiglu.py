"""Gated / squared activations: SwiGLU (silu(gate) * up) and ReLU^2 (relu(x) ** 2).

Triton elementwise kernels (large 1D blocks, fp32 math), autograd Functions that
recompute the activation in backward instead of saving it, and plain-torch
references. Forward rounding reproduces eager bf16/fp16 semantics
(activation rounded to the input dtype before the product).

`swiglu_linear` / `relu2_linear` also apply the MLP's down projection, so that
the activation h is not kept for the weight gradient either: backward rebuilds
it from gate/up in the same kernel pass that computes dgate/dup.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from .launch import unused_pointer, wrap_triton, written_buffer

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


def swiglu_linear_packed_reference(gate_up, weight, bias=None):
    return swiglu_linear_reference(*gate_up.chunk(2, dim=-1), weight, bias)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    # torch.compile finds the tensors a kernel writes by tracing each store's pointer back to the kernel's arguments,
    # through the arguments of any function that produced it: offsets are computed apart from the loads, so that a
    # store through them does not count G and U as written (which would make compiled graphs copy them).
    @triton.jit
    def _gate_up_offsets(pid, offs, width, BLOCK: tl.constexpr, PACKED: tl.constexpr):
        """The offsets of the gate and up values of this block: `offs` for dense G and U, or, PACKED, into G as a
        [rows, 2 * width] tensor (each row: the gate's width values, then up's; the row division runs in int32 on
        offsets local to the block)."""
        if PACKED:
            start = pid.to(tl.int64) * BLOCK
            row0 = start // width
            local = (start - row0 * width).to(tl.int32) + tl.arange(0, BLOCK)
            g_offs = (row0 + local // width) * 2 * width + local % width
            return g_offs, g_offs + width
        return offs, offs

    @triton.jit
    def _load_gate_up(G, U, g_offs, u_offs, mask, PACKED: tl.constexpr):
        """(g, u) in fp32 from dense G and U, or, PACKED, both from G."""
        g = tl.load(G + g_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load((G if PACKED else U) + u_offs, mask=mask, other=0.0).to(tl.float32)
        return g, u

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n_elements, width, BLOCK: tl.constexpr, PACKED: tl.constexpr):
        # PACKED: G holds gate and up as a [rows, 2 * width] tensor; U is unused
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g_offs, u_offs = _gate_up_offsets(pid, offs, width, BLOCK, PACKED)
        g, u = _load_gate_up(G, U, g_offs, u_offs, mask, PACKED)
        act = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)

    # The backward kernels can also store the forward output again into Y (STORE_Y), rounded exactly as the forward
    # kernel rounds it: the fused down projection needs it for its weight gradient and does not keep it. PACKED: G and
    # DG hold gate and up, and their gradients, as [rows, 2 * width] tensors; U and DU are unused.
    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, Y, n_elements, width, BLOCK: tl.constexpr, STORE_Y: tl.constexpr,
                           PACKED: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g_offs, u_offs = _gate_up_offsets(pid, offs, width, BLOCK, PACKED)
        g, u = _load_gate_up(G, U, g_offs, u_offs, mask, PACKED)
        sig = tl.sigmoid(g)
        silu = g * sig
        du = dy * silu
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + g_offs, dg.to(DG.dtype.element_ty), mask=mask)
        if PACKED:
            tl.store(DG + u_offs, du.to(DG.dtype.element_ty), mask=mask)
        else:
            tl.store(DU + u_offs, du.to(DU.dtype.element_ty), mask=mask)
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


def _grid(n: int):
    return (triton.cdiv(n, BLOCK_SIZE),)


def _act_forward(g, u, dtype):
    """For dense inputs: swiglu(g, u) (same shapes); relu2(u) when g is None; swiglu on a packed [..., 2 * I] g
    (gate then up in each row) when u is None. The kernels index the elements flat: every tensor goes in as 1-D."""
    packed = u is None
    shape = (*g.shape[:-1], g.shape[-1] // 2) if packed else u.shape
    n = math.prod(shape)
    y = written_buffer(n, dtype, (g if packed else u).device)
    if n == 0:
        return y.view(shape)
    if g is None:
        wrap_triton(_relu2_fwd_kernel)[_grid(n)](u.view(-1), y, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    else:
        wrap_triton(_swiglu_fwd_kernel)[_grid(n)](g.view(-1), unused_pointer(g) if packed else u.view(-1), y, n,
                                                  shape[-1], BLOCK=BLOCK_SIZE, PACKED=packed, num_warps=NUM_WARPS)
    return y.view(shape)


def _act_backward(dy, g, u, y=None, reuse_dy=False):
    """(dg or None, du or None) for dense dy / g / u as in `_act_forward` (packed: dg is the packed gradient and du
    None); when `y` is given, the forward output is stored into it too.

    reuse_dy: dy is the caller's own temporary, so the first gradient (dg, or relu2's du) may overwrite it where the
    dtypes match: one buffer fewer at the backward's peak. Safe because each program reads its block of dy before
    writing the same block. (A packed gradient is twice dy's size: the caller may pass dy as `y` instead.)"""
    packed = u is None
    first = u if g is None else g
    reuse = reuse_dy and not packed and dy.dtype == first.dtype
    flat_dy = dy.view(-1)
    du = None if packed else (flat_dy if reuse and g is None else written_buffer(u.numel(), u.dtype, u.device))
    dg = None if g is None else (flat_dy if reuse else written_buffer(g.numel(), g.dtype, g.device))
    store = y is not None
    n = dy.numel()
    if n and g is None:
        wrap_triton(_relu2_bwd_kernel)[_grid(n)](flat_dy, u.view(-1), du, y.view(-1) if store else unused_pointer(du),
                                                 n, BLOCK=BLOCK_SIZE, STORE_Y=store, num_warps=NUM_WARPS)
    elif n:
        unused = unused_pointer(dg)
        wrap_triton(_swiglu_bwd_kernel)[_grid(n)](flat_dy, g.view(-1), unused if packed else u.view(-1), dg,
                                                  unused if packed else du, y.view(-1) if store else unused, n,
                                                  dy.shape[-1], BLOCK=BLOCK_SIZE, STORE_Y=store, PACKED=packed,
                                                  num_warps=NUM_WARPS)
    return (None if dg is None else dg.view(g.shape)), (None if du is None else du.view(u.shape))


# The kernels run as torch.library ops: torch.compile traces through them (no graph break) and fuses the ops around
# them; an eager call runs the same function. An op returns no None: an absent gradient is an empty tensor.
if HAS_TRITON:

    @triton_op("nanovision::act", mutates_args=())
    def _act_op(gate: Optional[torch.Tensor], up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up (broadcast), or relu(up) ** 2 without a gate."""
        if gate is None:
            return _act_forward(None, up.contiguous(), up.dtype)
        shape = torch.broadcast_shapes(gate.shape, up.shape)
        return _act_forward(gate.expand(shape).contiguous(), up.expand(shape).contiguous(),
                            torch.promote_types(gate.dtype, up.dtype))

    @triton_op("nanovision::act_backward", mutates_args=())
    def _act_backward_op(dy: torch.Tensor, gate: Optional[torch.Tensor], up: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dgate, dup) at the broadcast shape (dgate empty without a gate)."""
        shape = dy.shape
        g = None if gate is None else gate.expand(shape).contiguous()
        dg, du = _act_backward(dy.contiguous(), g, up.expand(shape).contiguous())
        return (dy.new_empty(0) if dg is None else dg), du

    @triton_op("nanovision::act_linear", mutates_args=())
    def _act_linear_op(gate: Optional[torch.Tensor], up: Optional[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
        """F.linear(act, weight, bias): act = silu(gate) * up (same shapes), relu(up) ** 2 without a gate, or, without
        up, silu(gate[..., :I]) * gate[..., I:] for a gate of width 2 * I (gate and up as one projection's output)."""
        if gate is not None and up is not None and gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        if up is None and gate.shape[-1] % 2:
            raise ValueError(f"a packed gate/up input needs an even last dim (gate, then up), got {tuple(gate.shape)}")
        dtype = up.dtype if gate is None else gate.dtype if up is None else torch.promote_types(gate.dtype, up.dtype)
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            raise TypeError(f"weight/bias must be in the activation dtype {dtype} (cast them first under autocast)")
        g, u = (None if t is None else t.contiguous() for t in (gate, up))
        # The dtypes given are the compute dtypes: an enclosing autocast must not recast them (here, or in a backward
        # that runs on the autocast thread, as CPU backward does), or the gradients would not match the forward.
        with torch.autocast(weight.device.type, enabled=False):
            return F.linear(_act_forward(g, u, dtype), weight, bias)

    @triton_op("nanovision::act_linear_backward", mutates_args=())
    def _act_linear_backward_op(grad_out: torch.Tensor, gate: Optional[torch.Tensor], up: Optional[torch.Tensor],
                                weight: torch.Tensor, weight_grad: bool
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dgate, dup, dweight); dgate empty without a gate, dup empty without up, dweight empty unless
        weight_grad. act is rebuilt only for the weight gradient; dgate/dup come from the same pass either way."""
        g, u = (None if t is None else t.contiguous() for t in (gate, up))
        packed = u is None
        with torch.autocast(weight.device.type, enabled=False):
            # dh = grad_out @ W is a fresh temporary that the kernel overwrites, so that this backward's peak is no
            # higher than the unfused one's (gate, up, dh, dgate, dup): dgate goes over it, or, packed (whose gradient
            # is one new buffer of twice its size), the rebuilt activation
            dh = grad_out.matmul(weight).contiguous()
            act = None
            if weight_grad:
                act = dh if packed else torch.empty(u.shape, dtype=weight.dtype, device=u.device)
            dg, du = _act_backward(dh, g, u, act, reuse_dy=not packed)
            dw = (grad_out.reshape(-1, grad_out.shape[-1]).t().mm(act.reshape(-1, act.shape[-1])) if weight_grad
                  else weight.new_empty(0))
        empty = weight.new_empty(0)
        return (empty if dg is None else dg), (empty if du is None else du), dw


def _act_setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _act_backward_fn(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _act_backward_op(dy, gate, up)
    return (None if gate is None else dg.sum_to_size(gate.shape)), du.sum_to_size(up.shape)


def _act_linear_setup_context(ctx, inputs, output):
    gate, up, weight, bias = inputs
    ctx.save_for_backward(gate, up, weight)
    ctx.has_bias = bias is not None


def _act_linear_backward_fn(ctx, grad_out):
    """The activation is not kept: the backward rebuilds it from gate/up, bit-identical to the forward one, in the
    kernel that computes dgate/dup, then uses it for the weight gradient."""
    gate, up, weight = ctx.saved_tensors
    dg, du, dw = _act_linear_backward_op(grad_out, gate, up, weight, ctx.needs_input_grad[2])
    db = None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        with torch.autocast(weight.device.type, enabled=False):
            db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return (None if gate is None else dg), (None if up is None else du), (dw if ctx.needs_input_grad[2] else None), db


if HAS_TRITON:
    _act_op.register_autograd(_act_backward_fn, setup_context=_act_setup_context)
    _act_linear_op.register_autograd(_act_linear_backward_fn, setup_context=_act_linear_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Triton); the backward recomputes the activation instead of saving it."""
    return _act_op(gate, up)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 (Triton)."""
    return _act_op(None, x)


def swiglu_linear(gate, up, weight, bias=None):
    """F.linear(silu(gate) * up, weight, bias) (Triton activation) without saving the activation for backward.
    weight and bias must already be in the activation's dtype: under autocast the caller casts them, so that
    autograd's cast turns this op's low-precision weight gradient into the fp32 master one (as an autocast linear
    would)."""
    return _act_linear_op(gate, up, weight, bias)


def relu2_linear(x, weight, bias=None):
    """F.linear(relu(x) ** 2, weight, bias) (Triton activation) without saving the activation for backward."""
    return _act_linear_op(None, x, weight, bias)


def swiglu_linear_packed(gate_up, weight, bias=None):
    """swiglu_linear(gate, up, weight, bias) for gate and up packed as one [..., 2 * I] tensor (the output of one GEMM
    over the concatenated gate/up weights: gate first); its gradient is one tensor of that shape too, so the GEMM's
    backward needs no concatenation and no sum of two input gradients."""
    return _act_linear_op(gate_up, None, weight, bias)
