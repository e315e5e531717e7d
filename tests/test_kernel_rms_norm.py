"""The RMSNorm and LayerNorm kernels (nanovision/kernels/ops/rms_norm.py) against float64 references (conftest: the
device and the tolerances)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import (
    BF16,
    DTYPES,
    F16,
    F32,
    REBUILT_TOL,
    assert_close,
    f64,
    leaf,
    rand,
    record_launches,
    seed_case,
    tensor_pointers,
)

pytest.importorskip("triton")
from nanovision.kernels.ops import rms_norm as rms_norm_ops  # noqa: E402
from nanovision.kernels.ops.rms_norm import (  # noqa: E402
    layer_norm as tri_layer_norm,
    layer_norm_reference,
    rms_norm as tri_rms_norm,
    rms_norm_reference,
)


class AtenCalls(TorchDispatchMode):
    """The names of the aten ops called inside the block (a Triton op's own launches are not among them)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- #
# RMSNorm
# --------------------------------------------------------------------------- #
RMS_SHAPES = [(1, 64), (7, 100), (33, 320), (2, 3, 100)]


@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(poison, shape, dtype, with_weight, with_residual):
    seed_case("rms", shape, dtype, with_weight, with_residual)
    _check_rms_norm(shape, dtype, with_weight, with_residual)


@pytest.mark.parametrize("out_dtype", [BF16, F16])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_narrow_output_backward_from_the_output(poison, out_dtype, with_weight, with_residual):
    """fp32 input, bf16 / fp16 output (autocast_output): the backward rebuilds n = y / w from the output it keeps
    instead of the fp32 input, so the gradients carry the output's rounding (the projections' precision)."""
    seed_case("rms_narrow", out_dtype, with_weight, with_residual)
    _check_rms_norm((33, 320), F32, with_weight, with_residual, out_dtype, REBUILT_TOL[out_dtype])


def _check_rms_norm(shape, dtype, with_weight, with_residual, out_dtype=None, grad_tol=None):
    hidden = shape[-1]
    x = leaf(rand(*shape, dtype=dtype, scale=2.0, offset=0.5))
    w = leaf(rand(hidden, dtype=dtype, scale=0.3, offset=1.0)) if with_weight else None
    r = leaf(rand(*shape, dtype=dtype)) if with_residual else None
    _check_norm(lambda x, w, r: tri_rms_norm(x, w, 1e-6, r, out_dtype),
                lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), dict(x=x, w=w, r=r), out_dtype, grad_tol)


def _check_norm(norm, reference, inputs, out_dtype=None, grad_tol=None):
    """norm(**inputs) against reference(**the float64 inputs): the output (and with a residual `r`, the sum), then
    the gradients of every input given (names: their keys) for random output / sum gradients."""
    x, r = inputs["x"], inputs["r"]
    s_dtype = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)  # the sum's, as eager x + r
    out = norm(**inputs)
    inputs64 = {name: f64(t) if t is not None else None for name, t in inputs.items()}
    ref = reference(**inputs64)
    if r is not None:
        (y, s), (y_ref, s_ref) = out, ref
        assert s.dtype == s_dtype
        assert_close(s, s_ref, s_dtype, "sum")
    else:
        y, y_ref = out, ref
    y_dtype = out_dtype or s_dtype
    assert y.dtype == y_dtype and y.shape == x.shape
    assert_close(y, y_ref, y_dtype, "y")

    gy = rand(*x.shape, dtype=y_dtype)
    loss, loss_ref = (y * gy).sum(), (y_ref * gy.double()).sum()
    if r is not None:
        gs = rand(*x.shape, dtype=s_dtype)
        loss, loss_ref = loss + (s * gs).sum(), loss_ref + (s_ref * gs.double()).sum()
    names = [name for name, t in inputs.items() if t is not None]
    grads = torch.autograd.grad(loss, [inputs[name] for name in names])
    grads_ref = torch.autograd.grad(loss_ref, [inputs64[name] for name in names])
    for name, g, gr in zip(names, grads, grads_ref):
        assert g.dtype == inputs[name].dtype
        assert_close(g, gr, g.dtype, f"d{name}", grad_tol)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_out_dtype_rounds_the_fp32_result_once(poison, out_dtype):
    # what an autocast projection would do with the fp32 output (cast it), done by the kernel's store
    seed_case("rms_out", out_dtype)
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
    seed_case("rms_floor", tiny)
    x, w, r = leaf(rand(5, 96, scale=2.0)), leaf(rand(96, scale=0.3, offset=1.0)), leaf(rand(5, 96))
    with torch.no_grad():
        w[7] = tiny
    gy, gs = rand(5, 96).to(BF16), rand(5, 96)
    (y, s), (y32, s32) = tri_rms_norm(x, w, 1e-6, r, BF16), tri_rms_norm(x, w, 1e-6, r)
    n = rms_norm_reference(x, None, 1e-6, r)[0].detach()
    torch.testing.assert_close(y[:, 7].float(), n[:, 7] * rms_norm_ops.WEIGHT_FLOOR, atol=0, rtol=2**-7)
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
    seed_case("rms_many")
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
    seed_case("rms_nc", layout)
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
    seed_case("rms_sum_only")
    x, r = leaf(rand(5, 64)), leaf(rand(5, 64))
    _, s = tri_rms_norm(x, None, 1e-6, r)
    gx, gr = torch.autograd.grad(s.sum() * 3.0, (x, r))
    torch.testing.assert_close(gx, torch.full_like(gx, 3.0))
    torch.testing.assert_close(gr, torch.full_like(gr, 3.0))



@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("narrow", ["x", "residual"])
@pytest.mark.parametrize("narrow_dtype", [BF16, F16])
def test_norm_of_a_narrow_branch_added_to_a_wide_stream(poison, norm, narrow, narrow_dtype):
    """A bf16 / fp16 branch output added to an fp32 stream (autocast): the sum and output in fp32, and each input's
    gradient in its own dtype, the narrow one written by the kernel itself (no cast of the fp32 gradient after it)."""
    seed_case("narrow_branch", norm, narrow, narrow_dtype)
    x = leaf(rand(33, 320, dtype=narrow_dtype if narrow == "x" else F32, scale=2.0, offset=0.5))
    r = leaf(rand(33, 320, dtype=narrow_dtype if narrow == "residual" else F32))
    w = leaf(rand(320, scale=0.3, offset=1.0))
    if norm == "rms_norm":
        _check_norm(lambda x, w, r: tri_rms_norm(x, w, 1e-6, r), lambda x, w, r: rms_norm_reference(x, w, 1e-6, r),
                    dict(x=x, w=w, r=r))
    else:
        _check_norm(lambda x, w, r: tri_layer_norm(x, w, None, 1e-5, r),
                    lambda x, w, r: layer_norm_reference(x, w, None, 1e-5, r), dict(x=x, w=w, r=r))
    y, s = tri_rms_norm(x, w, 1e-6, r) if norm == "rms_norm" else tri_layer_norm(x, w, None, 1e-5, r)
    with AtenCalls() as calls:
        torch.autograd.grad(y.sum() + s.sum(), (x, r))
    assert "aten._to_copy.default" not in calls.names, calls.names


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_norm_of_no_rows_gives_zero_parameter_gradients(poison, norm):
    """An empty batch launches no kernel: the outputs are empty and the weight / bias gradients zero."""
    x, r, w, b = leaf(rand(0, 64)), leaf(rand(0, 64)), leaf(rand(64)), leaf(rand(64))
    y, s = tri_rms_norm(x, w, 1e-6, r) if norm == "rms_norm" else tri_layer_norm(x, w, b, 1e-5, r)
    assert y.shape == s.shape == (0, 64)
    params = (w,) if norm == "rms_norm" else (w, b)
    grads = torch.autograd.grad(y.sum() + s.sum(), (x, r, *params))
    assert [tuple(g.shape) for g in grads[:2]] == [(0, 64), (0, 64)]
    for g in grads[2:]:
        assert g.shape == (64,) and not g.any()


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_forward_passes_the_input_once(monkeypatch, with_weight):
    """Only the X argument of the forward kernel points at x: torch.compile copies a tensor once for every Triton
    argument that aliases it, so the unused residual / sum / weight pointers must be buffers of their own."""
    launches = record_launches(monkeypatch, rms_norm_ops)
    x = rand(6, 64)
    tri_rms_norm(x, rand(64) if with_weight else None, 1e-6)
    (args,) = launches
    same_memory = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() == x.data_ptr()]
    assert same_memory == [0]


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_backward_passes_each_tensor_once(monkeypatch, with_weight):
    """Likewise in the backward: without a weight or a gradient of the sum, those pointers get buffers of their own."""
    launches = record_launches(monkeypatch, rms_norm_ops)
    x = leaf(rand(6, 64))
    y = tri_rms_norm(x, leaf(rand(64)) if with_weight else None, 1e-6)
    y.backward(rand(6, 64))
    forward, backward = launches
    pointers = tensor_pointers(backward)
    assert len(set(pointers)) == len(pointers)


# --------------------------------------------------------------------------- #
# LayerNorm
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", ["weight and bias", "weight", "none"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm(poison, shape, dtype, params, with_residual):
    seed_case("ln", shape, dtype, params, with_residual)
    _check_layer_norm(shape, dtype, params, with_residual)


@pytest.mark.parametrize("out_dtype", [BF16, F16])
def test_layer_norm_narrow_output_of_a_wide_stream(poison, out_dtype):
    """fp32 stream and parameters, bf16 / fp16 output (autocast_output): the fp32 result rounded once, and the
    gradients of the fp32 inputs (the backward keeps the fp32 input)."""
    seed_case("ln_narrow", out_dtype)
    _check_layer_norm((33, 320), F32, "weight and bias", True, out_dtype)


def _check_layer_norm(shape, dtype, params, with_residual, out_dtype=None):
    hidden = shape[-1]
    # a large mean: a kernel that skipped the centring, or centred in low precision, would be far off
    x = leaf(rand(*shape, dtype=dtype, scale=2.0, offset=3.0))
    w = leaf(rand(hidden, dtype=dtype, scale=0.3, offset=1.0)) if params != "none" else None
    b = leaf(rand(hidden, dtype=dtype, scale=0.5)) if params == "weight and bias" else None
    r = leaf(rand(*shape, dtype=dtype)) if with_residual else None
    _check_norm(lambda x, w, b, r: tri_layer_norm(x, w, b, 1e-5, r, out_dtype),
                lambda x, w, b, r: layer_norm_reference(x, w, b, 1e-5, r), dict(x=x, w=w, b=b, r=r), out_dtype)


def test_layer_norm_matches_torch_and_many_rows(poison):
    """fp32 against torch's own layer_norm, with more rows than one backward program covers (the partial dW / dB
    sums)."""
    seed_case("ln_many")
    x, w, b = leaf(rand(300, 96, offset=1.0)), leaf(rand(96, scale=0.3, offset=1.0)), leaf(rand(96))
    y = tri_layer_norm(x, w, b, 1e-6)
    x2, w2, b2 = leaf(x), leaf(w), leaf(b)
    y_ref = torch.nn.functional.layer_norm(x2, (96,), w2, b2, 1e-6)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = rand(300, 96)
    g = torch.autograd.grad((y * gy).sum(), (x, w, b))
    gr = torch.autograd.grad((y_ref * gy).sum(), (x2, w2, b2))
    for a, e in zip(g, gr):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_layer_norm_non_contiguous(poison):
    seed_case("ln_nc")
    x, r = rand(100, 9, offset=1.0).t(), rand(100, 9).t()
    x, r = x.detach().requires_grad_(True), r.detach().requires_grad_(True)
    w, b = leaf(rand(100, scale=0.3, offset=1.0)), leaf(rand(100))
    y, s = tri_layer_norm(x, w, b, 1e-5, r)
    x64, w64, b64, r64 = f64(x), f64(w), f64(b), f64(r)
    y_ref, s_ref = layer_norm_reference(x64, w64, b64, 1e-5, r64)
    assert_close(y, y_ref, F32, "y")
    gy = rand(100, 9).t()
    g = torch.autograd.grad((y * gy).sum() + s.sum(), (x, w, b, r))
    gr = torch.autograd.grad((y_ref * gy.double()).sum() + s_ref.sum(), (x64, w64, b64, r64))
    for name, a, e in zip(("dx", "dw", "db", "dr"), g, gr):
        assert_close(a, e, F32, name)


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("param", ["weight", "bias"])
def test_norm_parameters_of_another_length_are_refused(norm, param):
    """The kernels read one parameter entry per column: a parameter of another shape would be read out of bounds."""
    if norm == "rms_norm" and param == "bias":
        pytest.skip("RMSNorm has no bias")
    x = rand(4, 64)
    kwargs = {param: rand(32)}
    with pytest.raises(ValueError, match=f"{norm}: {param} must have shape \\(64,\\)"):
        tri_rms_norm(x, eps=1e-6, **kwargs) if norm == "rms_norm" else tri_layer_norm(x, eps=1e-5, **kwargs)
