"""Rotary position embedding (HF rotate_half convention).

q: [B, Hq, T, D], k: [B, Hk, T, D] (any strides with a unit last-dim stride,
e.g. `x.view(B, T, H, D).transpose(1, 2)`), cos/sin: [B or 1, T, D] built as
cat(freqs, freqs).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

One Triton program handles one (batch, position) pair: it loads that position's
cos/sin once and rotates every q and k head. Outputs keep the input layout.
Backward is the transposed map (rotation by -angle).
"""

from typing import Tuple

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from ._compat import wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        X, sxb, sxh, sxt,
        OUT, sob, soh, sot,
        b, t, n_heads, half,
        c1, c2, s1, s2,
        BACKWARD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h < n_heads)[:, None] & (d < half)[None, :]
        x_ptr = X + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + d[None, :]
        o_ptr = OUT + b * sob + t * sot + h[:, None].to(tl.int64) * soh + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # transpose of the forward map
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q, sqb, sqh, sqt,
        K, skb, skh, skt,
        QO, sqob, sqoh, sqot,
        KO, skob, skoh, skot,
        COS, scb, sct,
        SIN, ssb, sst,
        T, n_q_heads, n_k_heads, half,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos_ptr = COS + b * scb + t * sct + d
        sin_ptr = SIN + b * ssb + t * sst + d
        c1 = tl.load(cos_ptr, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(Q, sqb, sqh, sqt, QO, sqob, sqoh, sqot, b, t, n_q_heads, half,
                      c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_D)
        _rotate_heads(K, skb, skh, skt, KO, skob, skoh, skot, b, t, n_k_heads, half,
                      c1, c2, s1, s2, BACKWARD, BLOCK_HK, BLOCK_D)


# tuning knobs (H100: 4 warps was best for 10+5 heads x 128)
ELEMS_PER_THREAD = 8
MAX_WARPS = 4


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `x` whose memory runs in x's stride order, dense. q/k arrive as [B, H, T, D]
    views of token-major [B, T, H * D] projections: empty_like would lay a non-dense view out as contiguous [B, H, T, D],
    so that attention's output and every gradient back to the projection would need a transposing copy."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))  # stable: equal strides keep their order
    return torch.empty([x.shape[i] for i in order], dtype=x.dtype, device=x.device).permute(
        *sorted(range(x.dim()), key=order.__getitem__))


def _cs_strides(c: torch.Tensor, B: int):
    # cos/sin: [B or 1, T, D] (also accepts [T, D]); batch stride 0 when broadcast
    if c.dim() == 2:
        return 0, c.stride(0)
    return (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


if HAS_TRITON:
    # a torch.library op: torch.compile traces through it (no graph break); an eager call runs the same function
    @triton_op("nanovision::rope", mutates_args=())
    def _rope_op(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(q, k) rotated by the angle, or with `backward` by minus the angle (the forward map's transpose)."""
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        if D % 2 != 0:
            raise ValueError(f"rotary head dim must be even, got {D}")
        if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
        for name, c in (("cos", cos), ("sin", sin)):
            if (c.dim() not in (2, 3) or c.shape[-1] != D or c.shape[-2] != T
                    or (c.dim() == 3 and c.shape[0] not in (1, B))):
                raise ValueError(f"{name} must be [B or 1, T, D] = [{B} or 1, {T}, {D}], got {tuple(c.shape)}")
        half = D // 2
        q = _unit_last(q)
        k = _unit_last(k)
        cos = _unit_last(cos)
        sin = _unit_last(sin)
        qo = _empty_in_memory_order(q)
        ko = _empty_in_memory_order(k)
        if B * T == 0:
            return qo, ko
        block_d = triton.next_power_of_2(half)
        block_hq = triton.next_power_of_2(Hq)
        block_hk = triton.next_power_of_2(Hk)
        per_prog = (block_hq + block_hk) * block_d
        num_warps = min(MAX_WARPS, triton.next_power_of_2(max(1, per_prog // (32 * ELEMS_PER_THREAD))))
        cb, ct = _cs_strides(cos, B)
        sb, st = _cs_strides(sin, B)
        wrap_triton(_rope_kernel)[(B * T,)](
            q, q.stride(0), q.stride(1), q.stride(2),
            k, k.stride(0), k.stride(1), k.stride(2),
            qo, qo.stride(0), qo.stride(1), qo.stride(2),
            ko, ko.stride(0), ko.stride(1), ko.stride(2),
            cos, cb, ct,
            sin, sb, st,
            T, Hq, Hk, half,
            BACKWARD=backward,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
            num_warps=num_warps,
        )
        return qo, ko


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    # an unused output's gradient arrives as zeros
    cos, sin = ctx.saved_tensors
    gq, gk = _rope_op(dq, dk, cos, sin, True)
    return gq, gk, None, None, None


if HAS_TRITON:
    _rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin [B or 1, T, D] (Triton).

    Outputs keep q/k's dtype and memory order (dense); cos/sin receive no gradient.
    """
    return _rope_op(q, k, cos, sin, False)
