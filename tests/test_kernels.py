"""Tests for nanovision.kernels (Triton kernels run on CPU through the Triton interpreter).

Every op is checked forward and backward against a float64 reference on fresh
random inputs. Output buffers allocated by the kernels are poisoned with NaN so
unwritten elements fail the comparison.

Set NANOVISION_TEST_CUDA=1 (on a GPU machine) to run the same tests on CUDA with
compiled kernels instead of the interpreter.
"""

import os

_ON_CUDA = os.environ.get("NANOVISION_TEST_CUDA", "0") == "1"
if not _ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / nanovision.kernels are imported

import copy  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nanovision.kernels as K  # noqa: E402
from nanovision.kernels import layers as L  # noqa: E402
from nanovision.kernels.fused_linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy as tri_flce,
    linear_cross_entropy_reference,
)
from nanovision.kernels.rms_norm import rms_norm as tri_rms_norm, rms_norm_reference  # noqa: E402
from nanovision.kernels.rope import (  # noqa: E402
    apply_rotary as tri_rope,
    apply_rotary_qkv as tri_rope_qkv,
    apply_rotary_qkv_reference,
    apply_rotary_reference,
)
from nanovision.kernels.swiglu import (  # noqa: E402
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
from nanovision.modeling_nanovision import NanoVisionZeroInitLinear  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
if _ON_CUDA and not torch.cuda.is_available():
    pytest.skip("NANOVISION_TEST_CUDA=1 but no CUDA device", allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16]
# relative L2 error bounds vs float64 (bf16 is loose: bf16 rounding, and the Triton
# interpreter truncates when casting fp32 -> bf16)
REL_TOL = {F32: 2e-5, BF16: 2e-2, F16: 5e-3}
# RMSNorm gradients from n rebuilt out of a bf16 / fp16 output (2^-8 / 2^-11 relative rounding; the interpreter's
# truncation to bf16 biases the weight gradient's sums)
REBUILT_TOL = {BF16: 1e-2, F16: 2e-3}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _seed(*parts):
    torch.manual_seed(zlib.crc32(repr(parts).encode()) + int(os.environ.get("NANOVISION_TEST_SEED", "0")))


def rand(*shape, dtype=F32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale + offset).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def f64(t):
    return t.detach().double().requires_grad_(True)


def assert_close(out, ref, dtype, name="", tol=None):
    assert out is not None, f"{name}: missing"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten output?)"
    tol = REL_TOL[dtype] if tol is None else tol
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item() / max(denom, 1e-12)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
    # elementwise bound too, so a few wrong elements cannot hide in the norm
    atol = tol * max(ref64.abs().max().item(), 1e-6)
    worst = (out64 - ref64).abs().max().item()
    assert worst <= 8 * atol, f"{name}: max abs error {worst:.3e} > {8 * atol:.3e}"


def saved_bytes(fn, dtype=BF16):
    """nbytes of each distinct storage autograd keeps while fn() runs under autocast to `dtype` (storages, not shapes:
    linear may save a 2D view of its input)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=dtype):
            fn()
    return list(storages.values())


@pytest.fixture
def poison(monkeypatch):
    """Fill every floating tensor made with torch.empty / empty_like with NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


# --------------------------------------------------------------------------- #
# RMSNorm
# --------------------------------------------------------------------------- #
RMS_SHAPES = [(1, 64), (7, 100), (33, 320), (2, 3, 100)]


@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(poison, shape, dtype, with_weight, with_residual):
    _seed("rms", shape, dtype, with_weight, with_residual)
    _check_rms_norm(shape, dtype, with_weight, with_residual)


@pytest.mark.parametrize("out_dtype", [BF16, F16])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_narrow_output_backward_from_the_output(poison, out_dtype, with_weight, with_residual):
    """fp32 input, bf16 / fp16 output (autocast_output): the backward rebuilds n = y / w from the output it keeps
    instead of the fp32 input, so the gradients carry the output's rounding (the projections' precision)."""
    _seed("rms_narrow", out_dtype, with_weight, with_residual)
    _check_rms_norm((33, 320), F32, with_weight, with_residual, out_dtype, REBUILT_TOL[out_dtype])


def _check_rms_norm(shape, dtype, with_weight, with_residual, out_dtype=None, grad_tol=None):
    hidden = shape[-1]
    x = leaf(rand(*shape, dtype=dtype, scale=2.0, offset=0.5))
    w = leaf(rand(hidden, dtype=dtype, scale=0.3, offset=1.0)) if with_weight else None
    r = leaf(rand(*shape, dtype=dtype)) if with_residual else None

    out = tri_rms_norm(x, w, 1e-6, r, out_dtype)
    x64, w64, r64 = f64(x), (f64(w) if w is not None else None), (f64(r) if r is not None else None)
    ref = rms_norm_reference(x64, w64, 1e-6, r64)

    if with_residual:
        (y, s), (y_ref, s_ref) = out, ref
        assert s.dtype == dtype
        assert_close(s, s_ref, dtype, "sum")
    else:
        y, y_ref = out, ref
    y_dtype = out_dtype or dtype
    assert y.dtype == y_dtype and y.shape == x.shape
    assert_close(y, y_ref, y_dtype, "y")

    gy = rand(*shape, dtype=y_dtype)
    loss, loss_ref = (y * gy).sum(), (y_ref * gy.double()).sum()
    if with_residual:
        gs = rand(*shape, dtype=dtype)
        loss, loss_ref = loss + (s * gs).sum(), loss_ref + (s_ref * gs.double()).sum()
    inputs = [t for t in (x, w, r) if t is not None]
    inputs64 = [t for t in (x64, w64, r64) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    grads_ref = torch.autograd.grad(loss_ref, inputs64)
    for name, g, gr in zip(("dx", "dw", "dr") if with_weight else ("dx", "dr"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, gr, dtype, name, grad_tol)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_out_dtype_rounds_the_fp32_result_once(poison, out_dtype):
    # what an autocast projection would do with the fp32 output (cast it), done by the kernel's store
    _seed("rms_out", out_dtype)
    x, w, r = leaf(rand(5, 96, scale=2.0)), leaf(rand(96, scale=0.3, offset=1.0)), leaf(rand(5, 96))
    (y, s), (y32, s32) = tri_rms_norm(x, w, 1e-6, r, out_dtype), tri_rms_norm(x, w, 1e-6, r)
    assert y.dtype == out_dtype and s.dtype == torch.float32 and torch.equal(s, s32)
    ref, ref_s = rms_norm_reference(x, w, 1e-6, r, out_dtype)
    assert torch.equal(ref_s, s) and torch.equal(ref, y32.to(out_dtype))
    # fp16: the same bits as casting afterwards; bf16: the CPU interpreter rounds toward zero, so within one ulp
    ulp = 0 if out_dtype == torch.float16 else 2**-7
    torch.testing.assert_close(y, ref, atol=0, rtol=ulp)
    # bf16: the backward rebuilds n from the rounded output: the fp32 output's gradients to that precision; fp16 (whose
    # range cannot hold the floored weight's products) keeps s: the same gradients
    gy, gs = rand(5, 96).to(out_dtype), rand(5, 96)
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + (s * gs).sum(), (x, w, r))
    expected = torch.autograd.grad((y32 * gy.float()).sum() + (s32 * gs).sum(), (x, w, r))
    for name, g, e in zip(("dx", "dw", "dr"), grads, expected):
        assert g.dtype == torch.float32
        if out_dtype == torch.float16:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        else:
            assert_close(g, e, F32, name, REBUILT_TOL[out_dtype])


@pytest.mark.parametrize("tiny", [0.0, 1e-39, -1e-30])
def test_rms_norm_narrow_output_floors_tiny_weights(poison, tiny):
    """y / w is undefined where w == 0 (or subnormal): a norm that keeps its bf16 output uses 2^-64 there, so it needs
    no check of its weight (a host-device sync). The output there is ~n * 2^-64 instead of ~0, and the gradients are
    the fp32 output's to the output's precision, finite, the weight's included."""
    rms_module = sys.modules["nanovision.kernels.rms_norm"]  # the package attribute is the dispatching function
    _seed("rms_floor", tiny)
    x, w, r = leaf(rand(5, 96, scale=2.0)), leaf(rand(96, scale=0.3, offset=1.0)), leaf(rand(5, 96))
    with torch.no_grad():
        w[7] = tiny
    gy, gs = rand(5, 96).to(BF16), rand(5, 96)
    (y, s), (y32, s32) = tri_rms_norm(x, w, 1e-6, r, BF16), tri_rms_norm(x, w, 1e-6, r)
    n = rms_norm_reference(x, None, 1e-6, r)[0].detach()
    torch.testing.assert_close(y[:, 7].float(), n[:, 7] * rms_module.WEIGHT_FLOOR, atol=0, rtol=2**-7)
    mask = torch.ones(96, dtype=torch.bool, device=w.device)
    mask[7] = False
    torch.testing.assert_close(y[:, mask].float(), y32[:, mask], atol=0, rtol=2**-7)
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + (s * gs).sum(), (x, w, r))
    expected = torch.autograd.grad((y32 * gy.float()).sum() + (s32 * gs).sum(), (x, w, r))
    for name, g, e in zip(("dx", "dw", "dr"), grads, expected):
        assert torch.isfinite(g).all(), name
        assert_close(g, e, F32, name, REBUILT_TOL[BF16])
    assert abs(grads[1][7] - expected[1][7]) <= REBUILT_TOL[BF16] * expected[1].abs().max()  # the floored entry


def test_rms_norm_matches_eager_fp32_and_many_rows(poison):
    # more rows than one backward program covers -> exercises the partial dW reduction
    _seed("rms_many")
    x = leaf(rand(300, 64))
    w = leaf(rand(64, scale=0.3, offset=1.0))
    y = tri_rms_norm(x, w, 1e-5)
    x2, w2 = leaf(x), leaf(w)
    y_ref = rms_norm_reference(x2, w2, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = rand(300, 64)
    g = torch.autograd.grad((y * gy).sum(), (x, w))
    gr = torch.autograd.grad((y_ref * gy).sum(), (x2, w2))
    torch.testing.assert_close(g[0], gr[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1], gr[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_rms_norm_non_contiguous(poison, layout):
    _seed("rms_nc", layout)
    if layout == "row_strided":
        base = rand(9, 128)
        x, r = base[:, :100], rand(9, 160)[:, 30:130]
    else:
        x, r = rand(100, 9).t(), rand(100, 9).t()
    assert not x.is_contiguous()
    x, r = x.detach().requires_grad_(True), r.detach().requires_grad_(True)
    w = leaf(rand(100, scale=0.3, offset=1.0))
    y, s = tri_rms_norm(x, w, 1e-6, r)
    x64, w64, r64 = f64(x), f64(w), f64(r)
    y_ref, s_ref = rms_norm_reference(x64, w64, 1e-6, r64)
    assert_close(y, y_ref, F32, "y")
    assert_close(s, s_ref, F32, "s")
    gy = rand(100, 9).t()  # non-contiguous upstream gradient too
    g = torch.autograd.grad((y * gy).sum() + s.sum(), (x, w, r))
    gr = torch.autograd.grad((y_ref * gy.double()).sum() + s_ref.sum(), (x64, w64, r64))
    for name, a, b in zip(("dx", "dw", "dr"), g, gr):
        assert_close(a, b, F32, name)


def test_rms_norm_residual_only_sum_used(poison):
    # gradient flows only through the returned sum: normed output unused
    _seed("rms_sum_only")
    x, r = leaf(rand(5, 64)), leaf(rand(5, 64))
    _, s = tri_rms_norm(x, None, 1e-6, r)
    gx, gr = torch.autograd.grad(s.sum() * 3.0, (x, r))
    torch.testing.assert_close(gx, torch.full_like(gx, 3.0))
    torch.testing.assert_close(gr, torch.full_like(gr, 3.0))


def record_launches(monkeypatch, module):
    """The positional arguments of every Triton launch that `module` makes through wrap_triton, in order."""
    launches = []
    wrap_triton = module.wrap_triton

    def recording_wrap(kernel):
        launcher = wrap_triton(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(args)
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(module, "wrap_triton", recording_wrap)
    return launches


def tensor_pointers(args):
    return [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_forward_passes_the_input_once(monkeypatch, with_weight):
    """Only the X argument of the forward kernel points at x: torch.compile copies a tensor once for every Triton
    argument that aliases it, so the unused residual / sum / weight pointers must be buffers of their own."""
    launches = record_launches(monkeypatch, K._rms_mod)
    x = rand(6, 64)
    tri_rms_norm(x, rand(64) if with_weight else None, 1e-6)
    (args,) = launches
    same_memory = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() == x.data_ptr()]
    assert same_memory == [0]


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_backward_passes_each_tensor_once(monkeypatch, with_weight):
    """Likewise in the backward: without a weight or a gradient of the sum, those pointers get buffers of their own."""
    launches = record_launches(monkeypatch, K._rms_mod)
    x = leaf(rand(6, 64))
    y = tri_rms_norm(x, leaf(rand(64)) if with_weight else None, 1e-6)
    y.backward(rand(6, 64))
    forward, backward = launches
    pointers = tensor_pointers(backward)
    assert len(set(pointers)) == len(pointers)


# --------------------------------------------------------------------------- #
# SwiGLU / ReLU^2
# --------------------------------------------------------------------------- #
ACT_SHAPES = [(1, 64), (7, 100), (33, 320), (2, 3, 100)]


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(poison, shape, dtype):
    _seed("swiglu", shape, dtype)
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
    _seed("relu2", shape, dtype)
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
    _seed("act_nc")
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
    _seed("act_linear", shape, dtype, act, with_bias)
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
    _seed("act_linear_frozen")
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
    _seed("swiglu_packed", shape, dtype, with_bias)
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
    launches = record_launches(monkeypatch, K._swiglu_mod)
    gate_up = leaf(rand(5, 128, scale=2.0))
    dgate_up, = torch.autograd.grad(tri_swiglu_linear_packed(gate_up, leaf(rand(24, 64, scale=0.1))).sum(), gate_up)
    forward, backward = launches
    assert tensor_pointers(forward).count(gate_up.data_ptr()) == 1
    assert tensor_pointers(backward).count(gate_up.data_ptr()) == 1
    assert tensor_pointers(backward).count(dgate_up.data_ptr()) == 1


def test_swiglu_linear_packed_frozen_weight_and_width_check(poison):
    _seed("swiglu_packed_frozen")
    gate_up, w = leaf(rand(5, 128, scale=2.0)), rand(24, 64, scale=0.1)
    (a,) = torch.autograd.grad(tri_swiglu_linear_packed(gate_up, w).sum(), (gate_up,))  # no activation rebuilt
    (b,) = torch.autograd.grad(F.linear(tri_swiglu(*gate_up.chunk(2, dim=-1)), w).sum(), (gate_up,))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="even last dim"):
        tri_swiglu_linear_packed(rand(5, 127), w)


# --------------------------------------------------------------------------- #
# RoPE
# --------------------------------------------------------------------------- #
def _cos_sin(batch, T, D, dtype, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64, device=DEVICE) / D))
    pos = torch.arange(T, dtype=torch.float64, device=DEVICE)[None, :] + 3 * torch.arange(
        batch, dtype=torch.float64, device=DEVICE)[:, None]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
    _seed("rope", case, dtype)
    q, k = _qk(B, Hq, T, D, layout, dtype), _qk(B, Hk, T, D, layout, dtype)
    if layout == "bthd" and T > 1:
        assert not q.is_contiguous()
    cos, sin = _cos_sin(cb, T, D, dtype)
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
    _seed("rope_q_only")
    q, k = _qk(2, 2, 3, 32, "bthd", F32), _qk(2, 1, 3, 32, "bthd", F32)
    cos, sin = _cos_sin(1, 3, 32, F32)
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
    _seed("rope_qkv", case, dtype)
    qkv = leaf(rand(B, T, (Hq + 2 * Hk) * D, dtype=dtype))
    cos, sin = _cos_sin(cb, T, D, dtype)
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
    _seed("rope_qkv_unused")
    qkv = leaf(rand(2, 3, 4 * 32))
    cos, sin = _cos_sin(1, 3, 32, F32)
    q, k, v = tri_rope_qkv(qkv, cos, sin, 2, 1)
    (grad,) = torch.autograd.grad(v.sum(), (qkv,))
    assert (grad[..., :96] == 0).all() and (grad[..., 96:] == 1).all()
    with pytest.raises(ValueError, match="n_q_heads"):
        tri_rope_qkv(qkv, cos, sin, 3, 1)


def test_rope_bad_angles_and_head_dims():
    q, k = _qk(1, 2, 3, 32, "bhtd", F32), _qk(1, 1, 3, 32, "bhtd", F32)
    cos, sin = _cos_sin(1, 3, 32, F32)
    with pytest.raises(ValueError, match="cos must be"):
        tri_rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="sin must be"):
        tri_rope_qkv(rand(1, 3, 4 * 32), cos, sin[..., :16], 2, 1)
    with pytest.raises(ValueError, match="even"):
        tri_rope(_qk(1, 2, 3, 31, "bhtd", F32), _qk(1, 1, 3, 31, "bhtd", F32), cos[..., :31], sin[..., :31])


# --------------------------------------------------------------------------- #
# Fused linear cross-entropy
# --------------------------------------------------------------------------- #
FLCE_SHAPES = [
    # N, H, V, chunk
    (64, 64, 300, 16),
    (33, 100, 257, 8),
]


def _flce_inputs(N, H, V, dtype, ignore_frac=0.25, lead=None):
    h = leaf(rand(*(lead or (N,)), H, dtype=dtype))
    w = leaf(rand(V, H, dtype=dtype, scale=2.0 / H ** 0.5))
    labels = torch.randint(0, V, lead or (N,), device=DEVICE)
    labels[torch.rand(labels.shape, device=DEVICE) < ignore_frac] = -100
    labels.view(-1)[0] = 3  # at least one valid target
    return h, w, labels


def _flce_check(out, ref, h, w, h64, w64, dtype, reduction, go=None):
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype, "loss", tol=REL_TOL[dtype] / 4 if dtype != F32 else 1e-5)
    if go is None:
        go = torch.rand(out.shape, device=DEVICE) + 0.5
    a = torch.autograd.grad((out * go).sum(), (h, w))
    b = torch.autograd.grad((ref * go.double()).sum(), (h64, w64))
    for name, p, r in zip(("dhidden", "dweight"), a, b):
        assert p.dtype == dtype
        assert_close(p, r, dtype, f"{reduction} {name}")


@pytest.mark.parametrize("shape", FLCE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [F16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_flce(poison, shape, dtype, reduction, softcap):
    N, H, V, chunk = shape
    _seed("flce", shape, dtype, reduction, softcap)
    h, w, labels = _flce_inputs(N, H, V, dtype)
    out = tri_flce(h, w, labels, ignore_index=-100, reduction=reduction, softcap=softcap, chunk_size=chunk)
    h64, w64 = f64(h), f64(w)
    ref = linear_cross_entropy_reference(h64, w64, labels, -100, reduction, softcap)
    if reduction == "none":
        assert out.shape == (N,)
        assert (out[labels == -100] == 0).all()
    _flce_check(out, ref, h, w, h64, w64, dtype, reduction)


def test_flce_default_chunking_3d_and_fp32_unfused_path(poison):
    # [B, T, H] hidden, [B, T] labels, default chunk size; compare with the unfused
    # fp32 path (logits = h @ W.T, softcap, F.cross_entropy) directly
    _seed("flce3d")
    h, w, labels = _flce_inputs(None, 48, 200, F32, lead=(2, 20))
    out = tri_flce(h, w, labels, softcap=5.0)
    h2, w2 = leaf(h), leaf(w)
    logits = h2 @ w2.t()
    logits = 5.0 * torch.tanh(logits / 5.0)
    ref = F.cross_entropy(logits.reshape(-1, 200), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    a = torch.autograd.grad(out, (h, w))
    b = torch.autograd.grad(ref, (h2, w2))
    assert a[0].shape == h.shape
    for p, r in zip(a, b):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flce_gradient_accumulation(poison, as_tensor):
    _seed("flce_ga", as_tensor)
    N, H, V = 48, 32, 150
    h, w, labels = _flce_inputs(N, H, V, F32, ignore_frac=0.3)
    full = tri_flce(h, w, labels, chunk_size=16)
    g_full = torch.autograd.grad(full, (h, w))

    n_items = int((labels != -100).sum())
    nib = torch.tensor(n_items, device=DEVICE) if as_tensor else n_items
    w2 = leaf(w)
    total = 0.0
    gh_parts, gw = [], torch.zeros_like(w)
    for sl in (slice(0, N // 2), slice(N // 2, N)):
        hp = leaf(h[sl])
        lp = tri_flce(hp, w2, labels[sl], num_items_in_batch=nib, chunk_size=16)
        ghp, gwp = torch.autograd.grad(lp, (hp, w2))
        total = total + lp
        gh_parts.append(ghp)
        gw += gwp
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(gh_parts), g_full[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, g_full[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_flce_large_denominator_low_precision(poison, dtype):
    # mean over many items with a loss-scaler-like grad_output: per-logit gradients
    # ~ 1 / (V * n_items) would underflow fp16 if the 1/n_items were applied in the kernel
    _seed("flce_lowp", dtype)
    h, w, labels = _flce_inputs(40, 64, 300, dtype)
    n_items = 100_000
    out = tri_flce(h, w, labels, num_items_in_batch=n_items, chunk_size=16)
    h64, w64 = f64(h), f64(w)
    ref = linear_cross_entropy_reference(h64, w64, labels, num_items_in_batch=n_items)
    _flce_check(out, ref, h, w, h64, w64, dtype, "mean/n_items", go=torch.tensor(4096.0, device=DEVICE))


def test_flce_frozen_weight_no_grad_and_all_ignored(poison):
    _seed("flce_misc")
    h, w, labels = _flce_inputs(20, 32, 100, F32)
    w.requires_grad_(False)
    out = tri_flce(h, w, labels, reduction="sum", chunk_size=6)
    ref = linear_cross_entropy_reference(leaf(h), w, labels, reduction="sum")
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    (gh,) = torch.autograd.grad(out, (h,))
    assert torch.isfinite(gh).all()
    with torch.no_grad():
        out_ng = tri_flce(h, w, labels, reduction="mean")
    assert not out_ng.requires_grad
    torch.testing.assert_close(out_ng, linear_cross_entropy_reference(h.detach(), w, labels), rtol=1e-5, atol=1e-6)
    ignored = torch.full_like(labels, -100)
    out0 = tri_flce(h, w, ignored, reduction="sum")
    (g0,) = torch.autograd.grad(out0, (h,))
    assert out0.item() == 0.0 and (g0 == 0).all()


def test_flce_never_materialises_full_logits(monkeypatch):
    _seed("flce_mem")
    N, H, V, chunk = 40, 16, 120, 8
    h, w, labels = _flce_inputs(N, H, V, F32)
    shapes = []
    real_mm = torch.mm

    def spy(a, b, *args, **kw):
        out = real_mm(a, b, *args, **kw)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", spy)
    loss = tri_flce(h, w, labels, chunk_size=chunk)
    loss.backward()
    assert shapes and all(s[0] * s[1] <= max(chunk * V, chunk * H) for s in shapes), shapes


# --------------------------------------------------------------------------- #
# backend selection / dispatch
# --------------------------------------------------------------------------- #
def test_backend_selection():
    K._reset_backends()
    backends = K.kernel_backends()
    assert set(backends) == {"rms_norm", "swiglu", "rope", "linear_ce", "varlen_attention"}
    assert all(b == "triton" for b in backends.values())
    assert K.describe_backends() == (
        "nanovision kernels: rms_norm=triton swiglu=triton rope=triton linear_ce=triton varlen_attention=triton"
    )


def test_forced_eager_backend(monkeypatch):
    monkeypatch.setenv("NANOVISION_KERNEL_BACKEND", "eager")
    K._reset_backends()
    try:
        assert set(K.kernel_backends().values()) == {"eager"}
        x = rand(3, 64)
        torch.testing.assert_close(K.rms_norm(x), rms_norm_reference(x))
        h, w, labels = _flce_inputs(10, 16, 50, F32)
        torch.testing.assert_close(K.fused_linear_cross_entropy(h, w, labels),
                                   linear_cross_entropy_reference(h, w, labels))
        g, u, w = rand(3, 32), rand(3, 32), rand(8, 32)
        torch.testing.assert_close(K.swiglu_linear(g, u, w), swiglu_linear_reference(g, u, w))
        torch.testing.assert_close(K.relu2_linear(u, w), relu2_linear_reference(u, w))
    finally:
        monkeypatch.delenv("NANOVISION_KERNEL_BACKEND")
        K._reset_backends()


@pytest.mark.parametrize("backend", ["eager", "torch_compile"])
def test_fused_rms_norm_autocast_output_on_reference_backends(monkeypatch, backend):
    """FusedRMSNorm(autocast_output=True) under bf16 autocast through the plain-torch reference: the Triton path's
    outputs, and its gradients to the precision of the n it rebuilds from the bf16 output."""
    if backend == "torch_compile" and not K._compile_usable():
        pytest.skip("torch.compile is not usable here")
    _seed("rms_reference_backend")
    norm = K.FusedRMSNorm(nn.Parameter(rand(64, scale=0.3, offset=1.0)), autocast_output=True)
    x, r, gy = leaf(rand(3, 5, 64, scale=2.0)), leaf(rand(3, 5, 64)), rand(3, 5, 64).to(BF16)

    def run():
        with torch.autocast(DEVICE, dtype=BF16):
            y, s = norm(x, r)
        assert y.dtype == BF16 and s.dtype == F32
        return (y, s, *torch.autograd.grad((y.float() * gy.float()).sum() + s.sum(), (x, r, norm.weight)))

    K._reset_backends()
    expected = run()
    monkeypatch.setenv("NANOVISION_KERNEL_BACKEND", backend)
    K._reset_backends()
    try:
        actual = run()
        assert K.kernel_backends()["rms_norm"] == backend  # a failed compile would have switched to eager
    finally:
        monkeypatch.delenv("NANOVISION_KERNEL_BACKEND")
        K._reset_backends()
    for name, a, e in zip(("y", "s", "dx", "dr", "dw"), actual, expected):
        assert_close(a, e, F32, name, REBUILT_TOL[BF16])


@pytest.mark.skipif(_ON_CUDA, reason="CPU tensors without the interpreter")
def test_act_linear_falls_back_per_call_without_interpreter(monkeypatch):
    # triton chosen for the process, but CPU tensors and no interpreter: the call must take the fallback backend
    K._reset_backends()
    try:
        assert K.kernel_backends()["swiglu"] == "triton"
        monkeypatch.setattr(K, "_interpret", lambda: False)
        monkeypatch.setattr(K, "_FALLBACK", "eager")  # not torch_compile: no inductor build on a test CPU
        monkeypatch.setattr(K._swiglu_mod, "_act_linear_op", None)  # the Triton path would fail loudly
        g, u, w, b = rand(3, 32), rand(3, 32), rand(8, 32), rand(8)
        torch.testing.assert_close(K.swiglu_linear(g, u, w, b), swiglu_linear_reference(g, u, w, b))
        torch.testing.assert_close(K.relu2_linear(u, w, b), relu2_linear_reference(u, w, b))
    finally:
        K._reset_backends()


# --------------------------------------------------------------------------- #
# apply_fused_kernels on stand-in modules with the model's interface
# --------------------------------------------------------------------------- #
class NanoVisionRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6, with_weight=True):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden)) if with_weight else None
        self.eps = eps

    def _norm(self, x):
        y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y

    def forward(self, hidden_states, residual=None):
        if residual is None:
            return self._norm(hidden_states)
        hidden_states = hidden_states + residual
        return self._norm(hidden_states), hidden_states


class NanoVisionTextMLP(nn.Module):
    def __init__(self, hidden, inter, mlp_type):
        super().__init__()
        self.mlp_type = mlp_type
        if mlp_type == "swiglu":
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        if self.mlp_type == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(torch.relu(self.up_proj(x)) ** 2)


class NanoVisionTextAttention(nn.Module):
    def __init__(self, hidden, n_heads, n_kv, head_dim):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.rotary_fn = apply_rotary_reference

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary_fn(q, k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class _Layer(nn.Module):
    def __init__(self, hidden, mlp_type, norm_weight):
        super().__init__()
        self.input_layernorm = NanoVisionRMSNorm(hidden, with_weight=norm_weight)
        self.self_attn = NanoVisionTextAttention(hidden, 4, 2, hidden // 4)
        self.post_attention_layernorm = NanoVisionRMSNorm(hidden)
        self.mlp = NanoVisionTextMLP(hidden, 2 * hidden + 4, mlp_type)

    def forward(self, x, residual, cos, sin):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class NanoVisionForCausalLM(nn.Module):
    def __init__(self, vocab=97, hidden=32, softcap=4.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([_Layer(hidden, "swiglu", True), _Layer(hidden, "relu2", False)])
        self.norm = NanoVisionRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.final_logit_softcapping = softcap
        self.linear_cross_entropy = None

    def forward(self, input_ids, labels):
        B, T = input_ids.shape
        D = self.layers[0].self_attn.head_dim
        dev = input_ids.device
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
        freqs = torch.arange(T, dtype=torch.float32, device=dev)[:, None] * inv
        emb = torch.cat((freqs, freqs), -1)[None]
        cos, sin = emb.cos(), emb.sin()
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        h, _ = self.norm(x, residual)
        hs = h[:, :-1].reshape(-1, h.shape[-1])
        shift = labels[:, 1:].reshape(-1)
        if self.linear_cross_entropy is not None:
            return self.linear_cross_entropy(hs, self.lm_head.weight, shift, ignore_index=-100, reduction="mean",
                                             softcap=self.final_logit_softcapping, num_items_in_batch=None)
        logits = self.lm_head(hs).float()
        logits = self.final_logit_softcapping * torch.tanh(logits / self.final_logit_softcapping)
        return F.cross_entropy(logits, shift, ignore_index=-100)


def _model():
    _seed("model")
    return NanoVisionForCausalLM().to(DEVICE)


def _batch():
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def test_apply_fused_kernels_matches_original(caplog):
    ref = _model()
    model = copy.deepcopy(ref)
    keys_before = list(model.state_dict().keys())
    params_before = {n: p for n, p in model.named_parameters()}
    L._LOGGED = False
    with caplog.at_level(logging.INFO, logger="nanovision"):
        out_model = K.apply_fused_kernels(model)
        K.apply_fused_kernels(model)  # idempotent; logs only once
    assert out_model is model
    assert sum("nanovision kernels:" in r.getMessage() for r in caplog.records) == 1
    assert list(model.state_dict().keys()) == keys_before
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert model.fused_kernel_ops == ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
    assert isinstance(model.norm, K.FusedRMSNorm)
    assert model.layers[1].input_layernorm.weight is None
    assert isinstance(model.layers[0].mlp, K.FusedMLP) and model.layers[1].mlp.mlp_type == "relu2"
    assert model.layers[0].self_attn.rotary_fn is K.apply_rotary
    assert model.layers[0].self_attn.qkv_fn is L.fused_qkv
    assert model.layers[0].self_attn.qkv_rotary_fn is L.fused_qkv_rotary
    assert model.linear_cross_entropy is K.fused_linear_cross_entropy
    assert "NanoVisionRMSNorm" not in {type(m).__name__ for m in model.modules()}
    assert type(ref.norm).__name__ == "NanoVisionRMSNorm"  # other instances untouched

    ids, labels = _batch()
    loss_ref, loss = ref(ids, labels), model(ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss_ref.backward()
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_matches_three_projections(bias):
    """One GEMM over the concatenated q/k/v weights: the three projections' outputs and gradients (float64); the input
    and weight gradients flow through the slices and the concatenation back to each Linear."""
    from nanovision.modeling_nanovision import project_qkv

    _seed("fused_qkv", bias)
    attention = nn.Module()
    for name, width in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16)):
        setattr(attention, name, nn.Linear(32, width, bias=bias, device=DEVICE, dtype=torch.float64))
    reference = copy.deepcopy(attention)
    x1 = leaf(rand(2, 5, 32, dtype=torch.float64))
    x2 = leaf(x1)
    fused, plain = L.fused_qkv(attention, x1), project_qkv(reference, x2)
    assert [t.shape for t in fused] == [t.shape for t in plain]
    grads = [rand(*t.shape, dtype=torch.float64) for t in plain]
    sum((a * g).sum() for a, g in zip(fused, grads)).backward()
    sum((a * g).sum() for a, g in zip(plain, grads)).backward()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)
    reference_params = dict(reference.named_parameters())
    for name, p in attention.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[name].grad, msg=name)


def test_fused_qkv_keeps_projections_that_are_not_plain_linears():
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, nn.Linear(8, 8, device=DEVICE))
    calls = []
    attention.k_proj.register_forward_hook(lambda module, args, out: calls.append("k") or out * 2)
    x = rand(3, 8)
    q, k, v = L.fused_qkv(attention, x)
    assert calls == ["k"]
    torch.testing.assert_close(k, attention.k_proj.weight.new_tensor(2.0) * F.linear(x, attention.k_proj.weight,
                                                                                      attention.k_proj.bias))


@pytest.mark.parametrize("hooked", [False, True])
def test_fused_qkv_rotary_matches_projections_then_rotary(poison, hooked):
    """One GEMM + the packed rotary: the same q/k/v and input/weight gradients as three projections, the model's
    views and the reference rotary; a hooked projection (not a plain linear) keeps its own call and is concatenated."""
    _seed("fused_qkv_rotary", hooked)
    attention = nn.Module()
    for name, width in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        setattr(attention, name, nn.Linear(24, width, bias=False, device=DEVICE))
    attention.config = SimpleNamespace(num_attention_heads=2, num_key_value_heads=1)
    reference = copy.deepcopy(attention)
    if hooked:
        for module in (attention, reference):
            module.k_proj.register_forward_hook(lambda module, args, out: out * 2)
    x1 = leaf(rand(2, 5, 24))
    x2 = leaf(x1)
    cos, sin = _cos_sin(1, 5, 32, F32)
    fused = L.fused_qkv_rotary(attention, x1, cos, sin)
    q, k, v = (projection(x2).view(2, 5, -1, 32).transpose(1, 2)
               for projection in (reference.q_proj, reference.k_proj, reference.v_proj))
    plain = (*apply_rotary_reference(q, k, cos, sin), v)
    grads = [rand(*t.shape) for t in plain]
    sum((a * g).sum() for a, g in zip(fused, grads)).backward()
    sum((a * g).sum() for a, g in zip(plain, grads)).backward()
    for name, a, b in zip("qkv", fused, plain):
        assert_close(a, b, F32, name)
    assert_close(x1.grad, x2.grad, F32, "dx")
    reference_params = dict(reference.named_parameters())
    for name, p in attention.named_parameters():
        assert_close(p.grad, reference_params[name].grad, F32, name)


def test_apply_fused_kernels_subset_and_validation():
    model = _model()
    K.apply_fused_kernels(model, ops=["rms_norm"])
    assert model.fused_kernel_ops == ("rms_norm",)
    assert isinstance(model.layers[0].input_layernorm, K.FusedRMSNorm)
    assert type(model.layers[0].mlp).__name__ == "NanoVisionTextMLP"
    assert model.layers[0].self_attn.rotary_fn is apply_rotary_reference
    assert model.linear_cross_entropy is None
    K.apply_fused_kernels(model, ops={"rope"})
    assert model.fused_kernel_ops == ("rms_norm", "rope")
    assert model.layers[1].self_attn.rotary_fn is K.apply_rotary
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        K.apply_fused_kernels(model, ops=["rms_norm", "flash_attention"])


def test_fused_modules_standalone():
    _seed("modules")
    norm = NanoVisionRMSNorm(64).to(DEVICE)
    fused = K.FusedRMSNorm.from_module(norm)
    assert fused.weight is norm.weight and fused.eps == norm.eps
    x, r = rand(3, 5, 64), rand(3, 5, 64)
    torch.testing.assert_close(fused(x), norm(x))
    for a, b in zip(fused(x, r), norm(x, r)):
        torch.testing.assert_close(a, b)
    for mlp_type in ("swiglu", "relu2"):
        mlp = NanoVisionTextMLP(64, 100, mlp_type).to(DEVICE)
        fmlp = K.FusedMLP.from_module(mlp)
        assert list(fmlp.state_dict()) == list(mlp.state_dict())
        x1, x2 = leaf(rand(2, 7, 64)), None
        x2 = leaf(x1)
        y1, y2 = fmlp(x1), mlp(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        (g1,), (g2,) = torch.autograd.grad(y1.sum(), (x1,)), torch.autograd.grad(y2.sum(), (x2,))
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_autocast_output_keeps_no_fp32_activation(with_residual):
    """Under bf16 autocast the norm keeps its bf16 output, which the projection after it keeps anyway (one storage),
    instead of the fp32 input or residual sum, whatever its weight holds; under fp16 autocast it keeps the fp32
    tensor."""
    _seed("rms_saved", with_residual)
    norm = K.FusedRMSNorm(nn.Parameter(rand(64, scale=0.3, offset=1.0)), autocast_output=True)
    proj = nn.Linear(64, 48, bias=False).to(DEVICE)
    x, r = leaf(rand(2, 5, 64)), leaf(rand(2, 5, 64))
    act = x.numel()  # bf16 output: 2 * act bytes, fp32 input or sum: 4 * act; no other saved tensor has these sizes

    def step():
        proj(norm(x, r)[0] if with_residual else norm(x))

    new = saved_bytes(step)
    assert 4 * act not in new and new.count(2 * act) == 1, new
    with torch.no_grad():
        norm.weight[0] = 0.0
    assert saved_bytes(step) == new
    fp16 = saved_bytes(step, torch.float16)
    assert fp16.count(4 * act) == 1 and sum(fp16) - sum(new) == 4 * act, (fp16, new)


def _mlp_pair(mlp_type, bias, seed="mlp_pair"):
    """(FusedMLP, the same weights taking the old path): the model's NanoVisionZeroInitLinear down_proj, and a no-op
    hook on the copy's, which makes FusedMLP call it as a module (activation, then down_proj(h))."""
    _seed(seed, mlp_type, bias)
    mlp = NanoVisionTextMLP(32, 72, mlp_type)
    mlp.down_proj = NanoVisionZeroInitLinear(72, 32, bias=bias)
    nn.init.normal_(mlp.down_proj.weight, std=0.1)
    fused = K.FusedMLP.from_module(mlp.to(DEVICE))
    old = copy.deepcopy(fused)
    old.down_proj.register_forward_hook(lambda module, args, out: None)
    return fused, old


@pytest.mark.parametrize("mlp_type", ["swiglu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_mlp_act_linear_matches_old_path(monkeypatch, mlp_type, bias, autocast):
    fused, old = _mlp_pair(mlp_type, bias)
    calls = []
    for name in ("swiglu_linear_packed", "swiglu_linear", "relu2_linear"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x1 = leaf(rand(2, 5, 32))
    x2 = leaf(x1)
    with torch.autocast(DEVICE, dtype=BF16, enabled=autocast):
        y1, y2 = fused(x1), old(x2)
    # the fused op ran for `fused` only, on gate and up from one GEMM
    assert calls == ["swiglu_linear_packed" if mlp_type == "swiglu" else "relu2_linear"]
    assert y1.dtype == (BF16 if autocast else F32)
    # the same ops on the same numbers: equal outputs (weight gradients: the same sums, possibly in another order)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    go = rand(*y1.shape)
    (y1.float() * go).sum().backward()
    (y2.float() * go).sum().backward()
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    if autocast and mlp_type == "swiglu":
        # the input gradient: one GEMM over the packed gate/up gradient, against two whose bf16 outputs are summed
        # (one more rounding): both against float64
        ref = copy.deepcopy(old).double()
        x64 = leaf(x1.detach().double())
        (ref(x64) * go.double()).sum().backward()
        for grad in (x1.grad, x2.grad):
            assert_close(grad, x64.grad, BF16, "dx")
    else:
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
    old_params = dict(old.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad.dtype == F32, name  # the fp32 master gradient, through autograd's cast
        torch.testing.assert_close(p.grad, old_params[name].grad, **tol, msg=name)


@pytest.mark.parametrize("mlp_type", ["swiglu", "relu2"])
def test_fused_mlp_does_not_save_the_activation(mlp_type):
    """Under bf16 autocast the old path's down_proj keeps its own bf16 copy of h = act(gate, up); the fused op keeps
    only gate/up (which the activation's backward needs anyway): for swiglu as the one packed output of their GEMM."""
    fused, old = _mlp_pair(mlp_type, bias=False)
    x = leaf(rand(2, 5, 32))
    h_bytes = 2 * 5 * 72 * 2  # bf16 [2, 5, 72]; no other saved tensor has this size (nor twice it)

    new, before = saved_bytes(lambda: fused(x)), saved_bytes(lambda: old(x))
    if mlp_type == "swiglu":  # old: gate, up and h; fused: gate/up packed
        assert before.count(h_bytes) == 3 and new.count(h_bytes) == 0 and new.count(2 * h_bytes) == 1, (before, new)
    else:  # old: up and h; fused: up
        assert before.count(h_bytes) == 2 and new.count(h_bytes) == 1, (before, new)
    assert sum(before) - sum(new) >= h_bytes, (before, new)
