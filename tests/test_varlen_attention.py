"""Tests for nanovision.kernels.ops.varlen_attention (conftest: the device, the Triton interpreter, the helpers).

Forward and backward are checked against a float64 per-document reference on fresh random fp32 inputs, with
documents shorter than a block, not a multiple of a block, empty, and spanning several blocks (the interpreter
configs use 16 / 32-token blocks).
"""

import pytest
import torch
from conftest import DEVICE, REL_TOL, TEST_ON_CUDA, assert_close, f64, rand, seed_case

pytest.importorskip("triton")
from nanovision.kernels.ops.varlen_attention import (  # noqa: E402
    varlen_attention,
    varlen_attention_reference,
)

ATTENTION_TOL = {**REL_TOL, torch.float32: 1e-4}


def cu_seqlens_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def qkv(total, n_heads, n_kv_heads, head_dim, dtype=torch.float32):
    return (
        rand(total, n_heads, head_dim, dtype=dtype).requires_grad_(),
        rand(total, n_kv_heads, head_dim, dtype=dtype).requires_grad_(),
        rand(total, n_kv_heads, head_dim, dtype=dtype).requires_grad_(),
    )


def run_and_compare(lengths, n_heads, n_kv_heads, head_dim, dtype=torch.float32, scale=None):
    cu = cu_seqlens_of(lengths)
    q, k, v = qkv(sum(lengths), n_heads, n_kv_heads, head_dim, dtype)
    out = varlen_attention(q, k, v, cu, max(lengths), scale)
    assert out.dtype == dtype
    q64, k64, v64 = f64(q), f64(k), f64(v)
    ref = varlen_attention_reference(q64, k64, v64, cu, max(lengths), scale)
    tol = ATTENTION_TOL[dtype]
    assert_close(out, ref, dtype, "out", tol)

    dout = rand(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, dtype, name, tol)


# --------------------------------------------------------------------------- #
# against the reference
# --------------------------------------------------------------------------- #
LENGTHS = {
    "mixed": [1, 17, 40, 64],
    "long": [100],
    "empty_doc": [5, 0, 33],
    # more documents than one tile of the kernels' document scan, empty ones at its edges
    "many": [0, 3, 20, 1, 33, 16, 0, 7, 48, 2, 0],
}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_reference_is_causal_sdpa_per_document(lengths):
    """The reference batches documents of a length class with padding: it must equal plain per-document SDPA."""
    import torch.nn.functional as F

    seed_case("reference", lengths)
    cu = cu_seqlens_of(lengths)
    q, k, v = (f64(t) for t in qkv(sum(lengths), 4, 2, 16))
    out = varlen_attention_reference(q, k, v, cu, max(lengths))
    bounds = cu.tolist()
    expected = torch.cat([
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                       enable_gqa=True).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    dout = rand(*out.shape, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
# grouped heads share query tiles: two to a tile (gqa), two tiles a group (gqa4), none (mha)
@pytest.mark.parametrize("heads", [(4, 2), (8, 2), (2, 2)], ids=["gqa", "gqa4", "mha"])
def test_matches_reference(poison, lengths, heads):
    seed_case("ref", lengths, heads)
    run_and_compare(lengths, *heads, head_dim=16)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_head_dims_and_scale(poison, head_dim):
    seed_case("dims", head_dim)
    run_and_compare([30, 47], 6, 2, head_dim, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(poison, dtype):
    if dtype == torch.bfloat16 and not TEST_ON_CUDA:
        pytest.skip("the Triton interpreter multiplies bf16 tl.dot operands as their raw uint16 bits")
    seed_case("half", dtype)
    run_and_compare([9, 50], 4, 2, 16, dtype=dtype)


# --------------------------------------------------------------------------- #
# documents stay separate
# --------------------------------------------------------------------------- #
def test_documents_isolated(poison):
    seed_case("isolated")
    lengths = [23, 40, 17, 33]
    cu = cu_seqlens_of(lengths)
    q, k, v = qkv(sum(lengths), 4, 2, 16)
    out = varlen_attention(q, k, v, cu, max(lengths))

    # new values for every token of document 1
    a, b = lengths[0], lengths[0] + lengths[1]
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[a:b] = rand(b - a, *t.shape[1:])
    out2 = varlen_attention(q2, k2, v2, cu, max(lengths))
    assert torch.equal(out2[:a], out[:a].detach()) and torch.equal(out2[b:], out[b:].detach())
    assert not torch.allclose(out2[a:b], out[a:b])

    # a loss on document 1 alone: no gradient reaches the other documents' tokens
    dq, dk, dv = torch.autograd.grad(out[a:b].sum(), (q, k, v))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.all(g[:a] == 0) and torch.all(g[b:] == 0), f"{name} leaks outside the document"
        assert g[a:b].abs().sum() > 0, f"{name} is zero inside the document"


@pytest.mark.skipif(not TEST_ON_CUDA, reason="70,000 documents are too many programs for the Triton interpreter")
def test_more_documents_than_a_grid_dimension_above_the_first_holds(poison):
    """Documents x heads share the grids' 1st dimension (up to 2^31 - 1 programs): a batch may hold more documents
    than the 65,535 that CUDA allows along the 2nd and 3rd."""
    seed_case("documents beyond 65535")
    lengths = torch.randint(0, 4, (70_000,), generator=torch.Generator().manual_seed(0)).tolist()
    run_and_compare(lengths, 4, 2, 16)


# --------------------------------------------------------------------------- #
# strided inputs
# --------------------------------------------------------------------------- #
def test_non_contiguous_views(poison):
    # q, k, v sliced out of one fused projection output [tokens, (Hq + 2 * Hkv) * D], as a model produces them
    seed_case("views")
    lengths, n_heads, n_kv_heads, head_dim = [21, 40], 4, 2, 16
    total = sum(lengths)
    cu = cu_seqlens_of(lengths)
    proj = rand(total, (n_heads + 2 * n_kv_heads) * head_dim).requires_grad_()
    q, k, v = proj.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(total, -1, head_dim) for t in (q, k, v))
    assert not q.is_contiguous() and not k.is_contiguous()
    out = varlen_attention(q, k, v, cu, max(lengths))

    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = varlen_attention(qc, kc, vc, cu, max(lengths))
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)

    # a non-contiguous upstream gradient too
    dout = rand(head_dim, total, n_heads).permute(1, 2, 0)
    (dproj,) = torch.autograd.grad(out, proj, dout)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout)
    torch.testing.assert_close(dproj, torch.cat([g.reshape(total, -1) for g in grads_c], -1), rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_errors():
    cu = cu_seqlens_of([4, 4])
    q, k, v = (t.detach() for t in qkv(8, 4, 2, 16))
    with pytest.raises(ValueError, match="3-D"):
        varlen_attention(q.reshape(8, 64), k, v, cu, 4)
    with pytest.raises(ValueError, match="same shape"):
        varlen_attention(q, k, v[:, :1], cu, 4)
    with pytest.raises(ValueError, match="total_tokens and head_dim"):
        varlen_attention(q, k[:6], v[:6], cu, 4)
    with pytest.raises(ValueError, match="multiple of k/v's heads"):
        varlen_attention(q[:, :3], k, v, cu, 4)
    with pytest.raises(ValueError, match="head_dim 24"):
        varlen_attention(rand(8, 4, 24), rand(8, 2, 24), rand(8, 2, 24), cu, 4)
    with pytest.raises(ValueError, match="dtype"):
        varlen_attention(q.double(), k.double(), v.double(), cu, 4)
    with pytest.raises(ValueError, match="dtype"):
        varlen_attention(q, k.half(), v, cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        varlen_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        varlen_attention(q, k, v, cu[:1], 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, 4.0)
    with pytest.raises(ValueError, match="more than the GPU grid's 65535"):
        varlen_attention(q, k, v, cu, 1 << 30)
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        varlen_attention(q, k, v, cu.to("meta" if DEVICE == "cpu" else "cpu"), 4)


def test_attention_interface_follows_autocast():
    """Under autocast a transformers model hands attention fp32 q/k (rotated by fp32 RoPE tables) and a bf16 v: the
    interface casts all three to the autocast dtype, as autocast does for SDPA. (float16: the interpreter's bf16 dot is
    wrong, see test_half_precision.)"""
    from nanovision.kernels.attention import varlen_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=DEVICE)
    q, k = rand(1, 4, 8, 16), rand(1, 2, 8, 16)
    v = rand(1, 2, 8, 16, dtype=torch.float16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, _ = varlen_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=position_ids)
    assert out.shape == (1, 8, 4, 16) and out.dtype == torch.float16
    tokens = [t[0].transpose(0, 1).half().double() for t in (q, k, v)]
    expected = varlen_attention_reference(*tokens, cu_seqlens_of([5, 3]), 5, 0.25)
    torch.testing.assert_close(out[0].double(), expected, atol=5e-3, rtol=5e-3)
