"""The rotary embedding kernels (nanovision/kernels/ops/rope.py) against float64 references."""

import pytest
import torch
from conftest import DTYPES, F32, assert_close, f64, leaf, rand, rotary_angles, seed_case

pytest.importorskip("triton")
from nanovision.kernels.ops.rope import (  # noqa: E402
    apply_rotary as tri_rope,
    apply_rotary_qkv as tri_rope_qkv,
    apply_rotary_qkv_reference,
    apply_rotary_reference,
)


# --------------------------------------------------------------------------- #
# RoPE
# --------------------------------------------------------------------------- #

ROPE_CASES = [
    # B, Hq, Hk, T, D, layout, cos batch
    (1, 2, 1, 1, 64, "bthd", 1),
    (2, 4, 2, 7, 64, "bthd", 2),
    (2, 3, 3, 5, 100, "bhtd", 1),
    (1, 5, 1, 9, 80, "bthd", 1),
    (2, 4, 2, 6, 64, "qkv", 1),
]


def _qk(B, H, T, D, layout, dtype):
    if layout == "bthd":  # the attention module's `.view(B, T, H, D).transpose(1, 2)`
        return rand(B, T, H, D, dtype=dtype).transpose(1, 2).requires_grad_(True)
    if layout == "qkv":  # the same of a slice of one q/k/v GEMM's output: not dense
        return rand(B, T, (H + 3) * D, dtype=dtype)[..., : H * D].view(B, T, H, D).transpose(1, 2).requires_grad_(True)
    return leaf(rand(B, H, T, D, dtype=dtype))


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(poison, case, dtype):
    B, Hq, Hk, T, D, layout, cb = case
    seed_case("rope", case, dtype)
    q, k = _qk(B, Hq, T, D, layout, dtype), _qk(B, Hk, T, D, layout, dtype)
    if layout == "bthd" and T > 1:
        assert not q.is_contiguous()
    cos, sin = rotary_angles(cb, T, D, dtype)
    qo, ko = tri_rope(q, k, cos, sin)
    q64, k64 = f64(q), f64(k)
    qr, kr = apply_rotary_reference(q64, k64, cos.double(), sin.double())
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    # outputs keep the inputs' memory order, dense: token-major stays token-major, so that attention's output and the
    # gradients back to the projections need no transposing copy
    for out in (qo, ko):
        assert (out.transpose(1, 2) if layout != "bhtd" else out).is_contiguous()
    assert_close(qo, qr, dtype, "q")
    assert_close(ko, kr, dtype, "k")
    gq, gk = rand(*q.shape, dtype=dtype), rand(*k.shape, dtype=dtype)
    a = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k))
    b = torch.autograd.grad((qr * gq.double()).sum() + (kr * gk.double()).sum(), (q64, k64))
    for name, p, r in zip(("dq", "dk"), a, b):
        assert p.shape == r.shape
        assert_close(p, r, dtype, name)


def test_rope_only_q_used(poison):
    seed_case("rope_q_only")
    q, k = _qk(2, 2, 3, 32, "bthd", F32), _qk(2, 1, 3, 32, "bthd", F32)
    cos, sin = rotary_angles(1, 3, 32, F32)
    qo, _ = tri_rope(q, k, cos, sin)
    gq, gk = torch.autograd.grad(qo.sum(), (q, k))
    q64 = f64(q)
    qr, _ = apply_rotary_reference(q64, f64(k), cos.double(), sin.double())
    (gq_ref,) = torch.autograd.grad(qr.sum(), (q64,))
    assert_close(gq, gq_ref, F32, "dq")
    assert (gk == 0).all()


ROPE_QKV_CASES = [
    # B, Hq, Hk, T, D, cos batch
    (1, 2, 1, 1, 64, 1),
    (2, 4, 2, 7, 64, 2),
    (2, 3, 3, 5, 100, 1),
    (1, 5, 1, 9, 80, 1),
]


@pytest.mark.parametrize("case", ROPE_QKV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qkv(poison, case, dtype):
    """RoPE on the packed q/k/v GEMM output: rotated q/k and v against the float64 reference, token-major outputs, and
    the packed gradient (dq and dk rotated back, dv copied) written in one tensor."""
    B, Hq, Hk, T, D, cb = case
    seed_case("rope_qkv", case, dtype)
    qkv = leaf(rand(B, T, (Hq + 2 * Hk) * D, dtype=dtype))
    cos, sin = rotary_angles(cb, T, D, dtype)
    outs = tri_rope_qkv(qkv, cos, sin, Hq, Hk)
    qkv64 = f64(qkv)
    refs = apply_rotary_qkv_reference(qkv64, cos.double(), sin.double(), Hq, Hk)
    for name, out, ref in zip("qkv", outs, refs):
        assert out.shape == ref.shape and out.dtype == dtype
        assert out.transpose(1, 2).is_contiguous(), name  # token-major, like the projection's output
        assert_close(out, ref, dtype, name)
    grads = [rand(*out.shape, dtype=dtype) for out in outs]
    (got,) = torch.autograd.grad(sum((out * g).sum() for out, g in zip(outs, grads)), (qkv,))
    (want,) = torch.autograd.grad(sum((ref * g.double()).sum() for ref, g in zip(refs, grads)), (qkv64,))
    assert got.shape == qkv.shape and got.is_contiguous()
    assert_close(got, want, dtype, "dqkv")


def test_rope_qkv_gradient_of_unused_outputs_and_bad_widths(poison):
    seed_case("rope_qkv_unused")
    qkv = leaf(rand(2, 3, 4 * 32))
    cos, sin = rotary_angles(1, 3, 32, F32)
    q, k, v = tri_rope_qkv(qkv, cos, sin, 2, 1)
    (grad,) = torch.autograd.grad(v.sum(), (qkv,))
    assert (grad[..., :96] == 0).all() and (grad[..., 96:] == 1).all()
    with pytest.raises(ValueError, match="n_q_heads"):
        tri_rope_qkv(qkv, cos, sin, 3, 1)


def test_rope_bad_angles_and_head_dims():
    q, k = _qk(1, 2, 3, 32, "bhtd", F32), _qk(1, 1, 3, 32, "bhtd", F32)
    cos, sin = rotary_angles(1, 3, 32, F32)
    with pytest.raises(ValueError, match="cos must be"):
        tri_rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="sin must be"):
        tri_rope_qkv(rand(1, 3, 4 * 32), cos, sin[..., :16], 2, 1)
    with pytest.raises(ValueError, match="even"):
        tri_rope(_qk(1, 2, 3, 31, "bhtd", F32), _qk(1, 1, 3, 31, "bhtd", F32), cos[..., :31], sin[..., :31])


@pytest.mark.parametrize("B, T", [(0, 3), (2, 0)], ids=["no-rows", "no-positions"])
def test_rope_empty_inputs(poison, B, T):
    """An empty batch or sequence: empty outputs and gradients of the inputs' shapes (the kernels write 1-D buffers
    viewed afterwards, which must not need a size inferred from zero elements)."""
    cos, sin = rotary_angles(1, T, 32, F32)
    qkv = leaf(rand(B, T, 4 * 32))
    q, k, v = tri_rope_qkv(qkv, cos, sin, 2, 1)
    assert (q.shape, k.shape, v.shape) == ((B, 2, T, 32), (B, 1, T, 32), (B, 1, T, 32))
    (grad,) = torch.autograd.grad(q.sum() + k.sum() + v.sum(), (qkv,))
    assert grad.shape == qkv.shape
    q, k = _qk(B, 2, T, 32, "bthd", F32), _qk(B, 1, T, 32, "bthd", F32)
    qo, ko = tri_rope(q, k, cos, sin)
    assert (qo.shape, ko.shape) == (q.shape, k.shape)
    assert [g.shape for g in torch.autograd.grad(qo.sum() + ko.sum(), (q, k))] == [q.shape, k.shape]
