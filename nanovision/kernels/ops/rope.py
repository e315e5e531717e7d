"""Rotary position embedding (HF rotate_half convention).

q: [B, Hq, T, D], k: [B, Hk, T, D] (any strides with a unit last-dim stride,
e.g. `x.view(B, T, H, D).transpose(1, 2)`), cos/sin: [B or 1, T, D] built as
cat(freqs, freqs).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

One Triton program handles one (batch, position) pair: it loads that position's
cos/sin once and rotates every q and k head. Outputs keep the input layout.
Backward is the transposed map (rotation by -angle).

`apply_rotary_qkv` takes the q/k/v projection's output as one [B, T, (Hq + 2 Hk) * D]
tensor (one GEMM) and returns rotated q, k and v as [B, H, T, D] views of token-major
buffers. Its backward writes the projection's gradient in one pass (rotating dq and dk
back, copying dv), where rotating into two tensors would leave a concatenation of dq,
dk and dv into that gradient to autograd: one more read and write of all three.
"""

from typing import Tuple

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from .launch import with_unit_last_stride, wrap_triton, written_buffer

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


def _qkv_head_dim(qkv: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> int:
    width = qkv.shape[-1]
    heads = n_q_heads + 2 * n_kv_heads
    if n_q_heads < 1 or n_kv_heads < 1 or width % heads or (width // heads) % 2:
        raise ValueError(f"qkv's last dim ({width}) must be (n_q_heads + 2 * n_kv_heads) = {heads} heads of an even "
                         f"head dim (n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads})")
    return width // heads


def _split_qkv(qkv: torch.Tensor, n_q_heads: int, n_kv_heads: int):
    """[B, T, (Hq + 2 Hk) * D] -> q [B, Hq, T, D], k and v [B, Hk, T, D] views."""
    B, T, _ = qkv.shape
    D = _qkv_head_dim(qkv, n_q_heads, n_kv_heads)
    q, k, v = qkv.split([n_q_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    return (q.view(B, T, n_q_heads, D).transpose(1, 2), k.view(B, T, n_kv_heads, D).transpose(1, 2),
            v.view(B, T, n_kv_heads, D).transpose(1, 2))


def apply_rotary_qkv_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, n_kv_heads: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _split_qkv(qkv, n_q_heads, n_kv_heads)
    return (*apply_rotary_reference(q, k, cos, sin), v)


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
    def _copy_heads(
        X, sxb, sxh, sxt,
        OUT, sob, soh, sot,
        b, t, n_heads, half,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h < n_heads)[:, None] & (d < half)[None, :]
        x_ptr = X + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + d[None, :]
        o_ptr = OUT + b * sob + t * sot + h[:, None].to(tl.int64) * soh + d[None, :]
        tl.store(o_ptr, tl.load(x_ptr, mask=mask).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, tl.load(x_ptr + half, mask=mask).to(OUT.dtype.element_ty), mask=mask)

    # torch.compile finds the tensors a kernel writes by tracing each store's pointer back to the kernel's arguments,
    # through the arguments of any function that produced it: the position comes from the program id alone, not from
    # the function that loads the angles, so that the stores do not count COS and SIN as written (and compiled graphs
    # do not copy them).
    @triton.jit
    def _position(T):
        """This program's position (b, t)."""
        pid = tl.program_id(0)
        return (pid // T).to(tl.int64), (pid % T).to(tl.int64)

    @triton.jit
    def _position_angles(COS, scb, sct, SIN, ssb, sst, b, t, half, BLOCK_D: tl.constexpr):
        """The cos/sin of position (b, t), each as its two halves (fp32)."""
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos_ptr = COS + b * scb + t * sct + d
        sin_ptr = SIN + b * ssb + t * sst + d
        c1 = tl.load(cos_ptr, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + half, mask=dmask, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

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
        b, t = _position(T)
        c1, c2, s1, s2 = _position_angles(COS, scb, sct, SIN, ssb, sst, b, t, half, BLOCK_D)
        _rotate_heads(Q, sqb, sqh, sqt, QO, sqob, sqoh, sqot, b, t, n_q_heads, half,
                      c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_D)
        _rotate_heads(K, skb, skh, skt, KO, skob, skoh, skot, b, t, n_k_heads, half,
                      c1, c2, s1, s2, BACKWARD, BLOCK_HK, BLOCK_D)

    @triton.jit
    def _rope_qkv_kernel(
        QKV, s_b, s_t,
        Q, sqb, sqh, sqt,
        K, skb, skh, skt,
        V, svb, svh, svt,
        COS, scb, sct,
        SIN, ssb, sst,
        T, n_q_heads, n_k_heads, half,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Forward: packed q/k/v (QKV, [B, T, (Hq + 2 Hk) * D], heads D apart) -> rotated Q, K and a copy V.
        Backward: the gradients Q, K, V -> the packed gradient QKV (Q and K rotated back). QKV is one pointer with
        column offsets: torch.compile copies a tensor passed as several aliasing kernel arguments."""
        b, t = _position(T)
        c1, c2, s1, s2 = _position_angles(COS, scb, sct, SIN, ssb, sst, b, t, half, BLOCK_D)
        head = 2 * half
        QKV_K = QKV + n_q_heads * head
        QKV_V = QKV_K + n_k_heads * head
        if BACKWARD:
            _rotate_heads(Q, sqb, sqh, sqt, QKV, s_b, head, s_t, b, t, n_q_heads, half,
                          c1, c2, s1, s2, True, BLOCK_HQ, BLOCK_D)
            _rotate_heads(K, skb, skh, skt, QKV_K, s_b, head, s_t, b, t, n_k_heads, half,
                          c1, c2, s1, s2, True, BLOCK_HK, BLOCK_D)
            _copy_heads(V, svb, svh, svt, QKV_V, s_b, head, s_t, b, t, n_k_heads, half, BLOCK_HK, BLOCK_D)
        else:
            _rotate_heads(QKV, s_b, head, s_t, Q, sqb, sqh, sqt, b, t, n_q_heads, half,
                          c1, c2, s1, s2, False, BLOCK_HQ, BLOCK_D)
            _rotate_heads(QKV_K, s_b, head, s_t, K, skb, skh, skt, b, t, n_k_heads, half,
                          c1, c2, s1, s2, False, BLOCK_HK, BLOCK_D)
            _copy_heads(QKV_V, s_b, head, s_t, V, svb, svh, svt, b, t, n_k_heads, half, BLOCK_HK, BLOCK_D)


# tuning knobs (tuned on H100 for 10 + 5 heads of 128: more warps per position did not help)
ELEMS_PER_THREAD = 8
MAX_WARPS = 4


def _written_in_memory_order(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a 1-D buffer for the kernel to write, that buffer as a tensor shaped like `x` whose memory runs in x's stride
    order, dense). q/k arrive as [B, H, T, D] views of token-major [B, T, H * D] projections: empty_like would lay a
    non-dense view out as contiguous [B, H, T, D], so that attention's output and every gradient back to the
    projection would need a transposing copy."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))  # stable: equal strides keep their order
    buffer = written_buffer(x.numel(), x.dtype, x.device)
    return buffer, buffer.view([x.shape[i] for i in order]).permute(*sorted(range(x.dim()), key=order.__getitem__))


def _cs_strides(c: torch.Tensor):
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
        cos, sin = _checked_angles(cos, sin, B, T, D)
        q = with_unit_last_stride(q)
        k = with_unit_last_stride(k)
        q_buffer, qo = _written_in_memory_order(q)
        k_buffer, ko = _written_in_memory_order(k)
        if B * T == 0:
            return qo, ko
        wrap_triton(_rope_kernel)[(B * T,)](
            q, q.stride(0), q.stride(1), q.stride(2),
            k, k.stride(0), k.stride(1), k.stride(2),
            q_buffer, qo.stride(0), qo.stride(1), qo.stride(2),
            k_buffer, ko.stride(0), ko.stride(1), ko.stride(2),
            cos, *_cs_strides(cos),
            sin, *_cs_strides(sin),
            T, Hq, Hk, D // 2,
            BACKWARD=backward,
            **_blocks(Hq, Hk, D, with_v=False),
        )
        return qo, ko

    @triton_op("nanovision::rope_qkv", mutates_args=())
    def _rope_qkv_op(
        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, n_kv_heads: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed q/k/v [B, T, (Hq + 2 Hk) * D] -> rotated q [B, Hq, T, D], rotated k and v [B, Hk, T, D] (views of
        token-major buffers)."""
        B, T, _ = qkv.shape
        D = _qkv_head_dim(qkv, n_q_heads, n_kv_heads)
        cos, sin = _checked_angles(cos, sin, B, T, D)
        qkv = with_unit_last_stride(qkv)
        heads = (n_q_heads, n_kv_heads, n_kv_heads)
        buffers = [written_buffer(B * T * h * D, qkv.dtype, qkv.device) for h in heads]
        qo, ko, vo = (b.view(B, T, h, D).transpose(1, 2) for b, h in zip(buffers, heads))
        if B * T:
            _launch_qkv(qkv, qo, ko, vo, cos, sin, backward=False, pointers=(qkv, *buffers))
        return qo, ko, vo

    @triton_op("nanovision::rope_qkv_backward", mutates_args=())
    def _rope_qkv_backward_op(
        dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The gradients of rope_qkv's outputs -> the gradient of its packed input, [B, T, (Hq + 2 Hk) * D]."""
        B, Hq, T, D = dq.shape
        Hk = dk.shape[1]
        cos, sin = _checked_angles(cos, sin, B, T, D)
        buffer = written_buffer(B * T * (Hq + 2 * Hk) * D, dq.dtype, dq.device)
        dqkv = buffer.view(B, T, (Hq + 2 * Hk) * D)
        if B * T:
            dq, dk, dv = (with_unit_last_stride(t) for t in (dq, dk, dv))
            _launch_qkv(dqkv, dq, dk, dv, cos, sin, backward=True, pointers=(buffer, dq, dk, dv))
        return dqkv

    def _launch_qkv(qkv, q, k, v, cos, sin, backward: bool, pointers):
        """pointers: the (qkv, q, k, v) tensors the kernel reads and writes through, each the tensor named or the
        1-D buffer under it (that it writes); the strides are the named tensors'."""
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        qkv_ptr, q_ptr, k_ptr, v_ptr = pointers
        wrap_triton(_rope_qkv_kernel)[(B * T,)](
            qkv_ptr, qkv.stride(0), qkv.stride(1),
            q_ptr, q.stride(0), q.stride(1), q.stride(2),
            k_ptr, k.stride(0), k.stride(1), k.stride(2),
            v_ptr, v.stride(0), v.stride(1), v.stride(2),
            cos, *_cs_strides(cos),
            sin, *_cs_strides(sin),
            T, Hq, Hk, D // 2,
            BACKWARD=backward,
            **_blocks(Hq, Hk, D, with_v=True),
        )


def _checked_angles(cos: torch.Tensor, sin: torch.Tensor, B: int, T: int, D: int):
    for name, c in (("cos", cos), ("sin", sin)):
        if (c.dim() not in (2, 3) or c.shape[-1] != D or c.shape[-2] != T
                or (c.dim() == 3 and c.shape[0] not in (1, B))):
            raise ValueError(f"{name} must be [B or 1, T, D] = [{B} or 1, {T}, {D}], got {tuple(c.shape)}")
    return with_unit_last_stride(cos), with_unit_last_stride(sin)


def _blocks(Hq: int, Hk: int, D: int, with_v: bool) -> dict:
    """Block sizes and warps of one program (all heads of one position, each as two halves of D)."""
    block_d = triton.next_power_of_2(D // 2)
    block_hq, block_hk = triton.next_power_of_2(Hq), triton.next_power_of_2(Hk)
    per_prog = (block_hq + block_hk * (2 if with_v else 1)) * block_d
    num_warps = min(MAX_WARPS, triton.next_power_of_2(max(1, per_prog // (32 * ELEMS_PER_THREAD))))
    return dict(BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=num_warps)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    # an unused output's gradient arrives as zeros
    cos, sin = ctx.saved_tensors
    gq, gk = _rope_op(dq, dk, cos, sin, True)
    return gq, gk, None, None, None


def _qkv_setup_context(ctx, inputs, output):
    _, cos, sin, _, _ = inputs
    ctx.save_for_backward(cos, sin)


def _qkv_backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return _rope_qkv_backward_op(dq, dk, dv, cos, sin), None, None, None, None


if HAS_TRITON:
    _rope_op.register_autograd(_backward, setup_context=_setup_context)
    _rope_qkv_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin [B or 1, T, D] (Triton).

    Outputs keep q/k's dtype and memory order (dense); cos/sin receive no gradient.
    """
    return _rope_op(q, k, cos, sin, False)


def apply_rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, n_kv_heads: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed q/k/v projections [B, T, (Hq + 2 Hk) * D] -> (q_rot [B, Hq, T, D], k_rot, v [B, Hk, T, D]) (Triton).

    Outputs are token-major and in qkv's dtype; the backward writes qkv's gradient in one pass."""
    return _rope_qkv_op(qkv, cos, sin, n_q_heads, n_kv_heads)
