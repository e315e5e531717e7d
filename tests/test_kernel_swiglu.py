"""The SwiGLU / ReLU^2 kernels, alone and with the down projection (nanovision/kernels/ops/swiglu.py), against
float64 references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16, DTYPES, F32, assert_close, f64, leaf, rand, record_launches, seed_case, tensor_pointers

pytest.importorskip("triton")
from nanovision.kernels.ops import swiglu as swiglu_ops  # noqa: E402
from nanovision.kernels.ops.swiglu import (  # noqa: E402
    relu2 as tri_relu2,
    relu2_linear as tri_relu2_linear,
    relu2_linear_reference,
    relu2_reference,
    swiglu as tri_swiglu,
    swiglu_linear as tri_swiglu_linear,
    swiglu_linear_packed as tri_swiglu_linear_packed,
    swiglu_linear_packed_reference,
    swiglu_linear_reference,
    swiglu_reference,
)


# --------------------------------------------------------------------------- #
# SwiGLU / ReLU^2
# --------------------------------------------------------------------------- #
ACT_SHAPES = [(1, 64), (7, 100), (33, 320), (2, 3, 100)]


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(poison, shape, dtype):
    seed_case("swiglu", shape, dtype)
    g, u = leaf(rand(*shape, dtype=dtype, scale=3.0)), leaf(rand(*shape, dtype=dtype))
    y = tri_swiglu(g, u)
    g64, u64 = f64(g), f64(u)
    y_ref = swiglu_reference(g64, u64)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    gy = rand(*shape, dtype=dtype)
    grads = torch.autograd.grad((y * gy).sum(), (g, u))
    grads_ref = torch.autograd.grad((y_ref * gy.double()).sum(), (g64, u64))
    for name, a, b in zip(("dgate", "dup"), grads, grads_ref):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2(poison, shape, dtype):
    seed_case("relu2", shape, dtype)
    x = leaf(rand(*shape, dtype=dtype, scale=2.0))
    y = tri_relu2(x)
    x64 = f64(x)
    y_ref = relu2_reference(x64)
    assert_close(y, y_ref, dtype, "y")
    gy = rand(*shape, dtype=dtype)
    (gx,) = torch.autograd.grad((y * gy).sum(), (x,))
    (gx_ref,) = torch.autograd.grad((y_ref * gy.double()).sum(), (x64,))
    assert_close(gx, gx_ref, dtype, "dx")
    assert (gx[x <= 0] == 0).all()


def test_swiglu_relu2_non_contiguous(poison):
    seed_case("act_nc")
    g = rand(100, 7).t().requires_grad_(True)
    u = rand(7, 200)[:, ::2].requires_grad_(True)
    assert not g.is_contiguous() and not u.is_contiguous()
    y = tri_swiglu(g, u)
    g64, u64 = f64(g), f64(u)
    y_ref = swiglu_reference(g64, u64)
    assert_close(y, y_ref, F32, "swiglu")
    gy = rand(100, 7).t()
    a = torch.autograd.grad((y * gy).sum(), (g, u))
    b = torch.autograd.grad((y_ref * gy.double()).sum(), (g64, u64))
    for name, p, q in zip(("dgate", "dup"), a, b):
        assert_close(p, q, F32, name)
    x = rand(100, 7).t().requires_grad_(True)
    y = tri_relu2(x)
    x64 = f64(x)
    y_ref = relu2_reference(x64)
    assert_close(y, y_ref, F32, "relu2")
    (gx,) = torch.autograd.grad((y * gy).sum(), (x,))
    (gx_ref,) = torch.autograd.grad((y_ref * gy.double()).sum(), (x64,))
    assert_close(gx, gx_ref, F32, "relu2 dx")


def _act_linear(act, gate, up, w, b, fused):
    """The activation + down projection, as the fused op (fused=True), as the unfused Triton activation then
    F.linear (fused=False), or as the reference (fused=None)."""
    if fused is None:
        return swiglu_linear_reference(gate, up, w, b) if act == "swiglu" else relu2_linear_reference(up, w, b)
    if fused:
        return tri_swiglu_linear(gate, up, w, b) if act == "swiglu" else tri_relu2_linear(up, w, b)
    return F.linear(tri_swiglu(gate, up) if act == "swiglu" else tri_relu2(up), w, b)


@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swiglu", "relu2"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_act_linear(poison, shape, dtype, act, with_bias):
    seed_case("act_linear", shape, dtype, act, with_bias)
    g, u = leaf(rand(*shape, dtype=dtype, scale=3.0)), leaf(rand(*shape, dtype=dtype, scale=2.0))
    w = leaf(rand(48, shape[-1], dtype=dtype, scale=shape[-1] ** -0.5))
    b = leaf(rand(48, dtype=dtype)) if with_bias else None
    g64, u64, w64, b64 = (None if t is None else f64(t) for t in (g, u, w, b))
    out = _act_linear(act, g, u, w, b, fused=True)
    ref = _act_linear(act, g64, u64, w64, b64, fused=None)
    assert out.dtype == dtype and out.shape == shape[:-1] + (48,)
    assert_close(out, ref, dtype, "out")
    # the same bits as the activation kernel followed by F.linear
    assert torch.equal(out, _act_linear(act, g, u, w, b, fused=False))
    go = rand(*out.shape, dtype=dtype)
    used = [i for i, t in enumerate((g, u, w, b)) if t is not None and (i > 0 or act == "swiglu")]
    grads = torch.autograd.grad((out * go).sum(), [(g, u, w, b)[i] for i in used])
    grads_ref = torch.autograd.grad((ref * go.double()).sum(), [(g64, u64, w64, b64)[i] for i in used])
    for i, a, r in zip(used, grads, grads_ref):
        name = ("dgate", "dup", "dweight", "dbias")[i]
        assert a.dtype == dtype
        assert_close(a, r, dtype, name)


def test_act_linear_frozen_weight_and_dtype_check(poison):
    seed_case("act_linear_frozen")
    g, u, w = leaf(rand(5, 64, scale=3.0)), leaf(rand(5, 64)), rand(24, 64, scale=0.1)
    out = tri_swiglu_linear(g, u, w)  # no weight gradient: the activation is not rebuilt
    a = torch.autograd.grad(out.sum(), (g, u))
    b = torch.autograd.grad(F.linear(tri_swiglu(g, u), w).sum(), (g, u))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match="activation dtype"):
        tri_relu2_linear(u.to(BF16), w)


# (3, 5000): blocks of the kernel span row boundaries (BLOCK 4096 elements)
@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 100), (3, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_swiglu_linear_packed(poison, shape, dtype, with_bias):
    """gate and up as one [..., 2 * I] tensor (one GEMM's output): against float64, and the same bits as the op on two
    tensors, forward and backward (the packed gradient is the two gradients side by side)."""
    seed_case("swiglu_packed", shape, dtype, with_bias)
    gate, up = rand(*shape, dtype=dtype, scale=3.0), rand(*shape, dtype=dtype, scale=2.0)
    gate_up = leaf(torch.cat([gate, up], dim=-1))
    w = leaf(rand(48, shape[-1], dtype=dtype, scale=shape[-1] ** -0.5))
    b = leaf(rand(48, dtype=dtype)) if with_bias else None
    params = [t for t in (gate_up, w, b) if t is not None]
    out = tri_swiglu_linear_packed(gate_up, w, b)
    params64 = [f64(t) for t in params]
    ref = swiglu_linear_packed_reference(*params64, *([None] if b is None else []))
    assert out.dtype == dtype and out.shape == shape[:-1] + (48,)
    assert_close(out, ref, dtype, "out")
    go = rand(*out.shape, dtype=dtype)
    grads = torch.autograd.grad((out * go).sum(), params)
    grads_ref = torch.autograd.grad((ref * go.double()).sum(), params64)
    for name, a, r in zip(("dgate_up", "dweight", "dbias"), grads, grads_ref):
        assert a.dtype == dtype
        assert_close(a, r, dtype, name)
    g2, u2, w2 = leaf(gate), leaf(up), leaf(w)
    out2 = tri_swiglu_linear(g2, u2, w2, b)
    assert torch.equal(out, out2)
    dg, du, dw = torch.autograd.grad((out2 * go).sum(), (g2, u2, w2))
    assert torch.equal(grads[0], torch.cat([dg, du], dim=-1)) and torch.equal(grads[1], dw)


def test_swiglu_linear_packed_passes_the_packed_tensors_once(monkeypatch):
    """The kernels read gate and up from the packed tensor through one pointer (and write the packed gradient through
    one): torch.compile would copy a tensor passed as several aliasing arguments."""
    launches = record_launches(monkeypatch, swiglu_ops)
    gate_up = leaf(rand(5, 128, scale=2.0))
    dgate_up, = torch.autograd.grad(tri_swiglu_linear_packed(gate_up, leaf(rand(24, 64, scale=0.1))).sum(), gate_up)
    forward, backward = launches
    assert tensor_pointers(forward).count(gate_up.data_ptr()) == 1
    assert tensor_pointers(backward).count(gate_up.data_ptr()) == 1
    assert tensor_pointers(backward).count(dgate_up.data_ptr()) == 1


def test_swiglu_linear_packed_frozen_weight_and_width_check(poison):
    seed_case("swiglu_packed_frozen")
    gate_up, w = leaf(rand(5, 128, scale=2.0)), rand(24, 64, scale=0.1)
    (a,) = torch.autograd.grad(tri_swiglu_linear_packed(gate_up, w).sum(), (gate_up,))  # no activation rebuilt
    (b,) = torch.autograd.grad(F.linear(tri_swiglu(*gate_up.chunk(2, dim=-1)), w).sum(), (gate_up,))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="even last dim"):
        tri_swiglu_linear_packed(rand(5, 127), w)
