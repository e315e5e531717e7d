"""The fused linear cross-entropy (nanovision/kernels/ops/linear_cross_entropy.py) against float64 references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16, DEVICE, DTYPES, F16, F32, REL_TOL, assert_close, f64, leaf, rand, seed_case

pytest.importorskip("triton")
from nanovision.kernels.ops.linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy as tri_flce,
    linear_cross_entropy_reference,
)


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
    seed_case("flce", shape, dtype, reduction, softcap)
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
    seed_case("flce3d")
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
    seed_case("flce_ga", as_tensor)
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
    seed_case("flce_lowp", dtype)
    h, w, labels = _flce_inputs(40, 64, 300, dtype)
    n_items = 100_000
    out = tri_flce(h, w, labels, num_items_in_batch=n_items, chunk_size=16)
    h64, w64 = f64(h), f64(w)
    ref = linear_cross_entropy_reference(h64, w64, labels, num_items_in_batch=n_items)
    _flce_check(out, ref, h, w, h64, w64, dtype, "mean/n_items", go=torch.tensor(4096.0, device=DEVICE))


def test_flce_frozen_weight_no_grad_and_all_ignored(poison):
    seed_case("flce_misc")
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
    seed_case("flce_mem")
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
