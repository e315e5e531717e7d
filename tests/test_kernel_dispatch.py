"""Which implementation the public kernel functions run (nanovision/kernels/dispatch.py): the backend chosen per
process, the forced one, and the per-call fallback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BF16, DEVICE, F32, REBUILT_TOL, TEST_ON_CUDA, assert_close, leaf, rand, seed_case
from torch import nn

pytest.importorskip("triton")
import nanovision.kernels as K  # noqa: E402
from nanovision.kernels import dispatch  # noqa: E402
from nanovision.kernels.ops import swiglu as swiglu_ops  # noqa: E402
from nanovision.kernels.ops.linear_cross_entropy import linear_cross_entropy_reference  # noqa: E402
from nanovision.kernels.ops.rms_norm import rms_norm_reference  # noqa: E402
from nanovision.kernels.ops.swiglu import relu2_linear_reference, swiglu_linear_reference  # noqa: E402


# --------------------------------------------------------------------------- #
# backend selection / dispatch
# --------------------------------------------------------------------------- #
def test_backend_selection():
    """One op vocabulary: the config's fused-kernel ops, plus the packed attention."""
    from nanovision.configuration_nanovision import FUSED_KERNEL_OPS

    assert K.OPS == FUSED_KERNEL_OPS + ("varlen_attention",)
    assert K.OPS == ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "layer_norm", "varlen_attention")
    dispatch.reset_backends()
    backends = K.kernel_backends()
    assert tuple(backends) == K.OPS
    assert all(b == "triton" for b in backends.values())
    assert K.describe_backends() == ("nanovision kernels: rms_norm=triton swiglu=triton rope=triton "
                                     "linear_cross_entropy=triton layer_norm=triton varlen_attention=triton")


def test_backends_are_chosen_outside_compiled_regions():
    """Choosing inside a compiled region costs graph breaks (dynamo cannot trace the probes), and the graph compiled
    around them keeps the breaks after the choice is cached: the choice is made at import, and again at once by
    reset_backends."""
    fresh = subprocess.run([sys.executable, "-c", "from nanovision.kernels import dispatch; print(dispatch._BACKENDS)"],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == str(K.kernel_backends())
    dispatch.reset_backends()
    assert dispatch._BACKENDS == K.kernel_backends()


# per case, in launch order (forward graph, then backward): each kernel and the arguments it writes, which are the
# buffers it fills and nothing it only reads
COMPILED_KERNEL_WRITES = {
    "rms_norm": [("_norm_fwd_kernel", ["RSTD", "Y"]), ("_norm_bwd_kernel", ["DW_PART", "DX"])],
    "rms_norm with residual": [("_norm_fwd_kernel", ["RSTD", "S", "Y"]), ("_norm_bwd_kernel", ["DW_PART", "DX"])],
    "layer_norm with residual": [("_norm_fwd_kernel", ["RSTD", "S", "Y"]),
                                 ("_norm_bwd_kernel", ["DB_PART", "DW_PART", "DX"])],
    "swiglu": [("_swiglu_fwd_kernel", ["Y"]), ("_swiglu_bwd_kernel", ["DG", "DU"])],
    "relu2": [("_relu2_fwd_kernel", ["Y"]), ("_relu2_bwd_kernel", ["DX"])],
    "swiglu_linear_packed": [("_swiglu_fwd_kernel", ["Y"]), ("_swiglu_bwd_kernel", ["DG", "Y"])],
    "rope": [("_rope_kernel", ["KO", "QO"]), ("_rope_kernel", ["KO", "QO"])],
    "rope_qkv": [("_rope_qkv_kernel", ["K", "Q", "V"]), ("_rope_qkv_kernel", ["QKV"])],
    "varlen_attention": [("_varlen_fwd_kernel", ["LSE", "OUT"]), ("_varlen_bwd_preprocess_kernel", ["DELTA"]),
                         ("_varlen_bwd_dkdv_kernel", ["DK", "DV"]), ("_varlen_bwd_dq_kernel", ["DQ"])],
}


def test_compiled_kernels_write_only_their_outputs():
    """torch.compile copies every tensor it takes a Triton kernel to write (tests/compiled_kernel_writes.py says how
    it decides): the kernels must show it only their own output buffers, never an input they only read (a copy a
    call in every compiled graph), and no buffer with a size-1 dim of symbolic stride (which torch 2.11's inductor
    cannot compile under dynamic shapes: a packed run whose batches change shape)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "compiled_kernel_writes.py")],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    traced = json.loads(run.stdout.strip().splitlines()[-1])
    assert {case: [(kernel, names) for kernel, names, _ in writes] for case, writes in traced.items()} == \
        COMPILED_KERNEL_WRITES
    size_one = {case: [w for w in writes if w[2]] for case, writes in traced.items()}
    assert not any(size_one.values()), size_one


def test_forced_eager_backend(monkeypatch):
    monkeypatch.setenv("NANOVISION_KERNEL_BACKEND", "eager")
    dispatch.reset_backends()
    try:
        assert set(K.kernel_backends().values()) == {"eager"}
        x = rand(3, 64)
        torch.testing.assert_close(K.rms_norm(x), rms_norm_reference(x))
        h, w, labels = rand(10, 16), rand(50, 16, scale=0.5), torch.randint(0, 50, (10,), device=DEVICE)
        torch.testing.assert_close(K.fused_linear_cross_entropy(h, w, labels),
                                   linear_cross_entropy_reference(h, w, labels))
        g, u, w = rand(3, 32), rand(3, 32), rand(8, 32)
        torch.testing.assert_close(K.swiglu_linear(g, u, w), swiglu_linear_reference(g, u, w))
        torch.testing.assert_close(K.relu2_linear(u, w), relu2_linear_reference(u, w))
    finally:
        monkeypatch.delenv("NANOVISION_KERNEL_BACKEND")
        dispatch.reset_backends()


@pytest.mark.parametrize("backend", ["eager", "torch_compile"])
def test_fused_rms_norm_autocast_output_on_reference_backends(monkeypatch, backend):
    """FusedRMSNorm(autocast_output=True) under bf16 autocast through the plain-torch reference: the Triton path's
    outputs, and its gradients to the precision of the n it rebuilds from the bf16 output."""
    if backend == "torch_compile" and not dispatch._compile_usable():
        pytest.skip("torch.compile is not usable here")
    seed_case("rms_reference_backend")
    norm = K.FusedRMSNorm(nn.Parameter(rand(64, scale=0.3, offset=1.0)), autocast_output=True)
    x, r, gy = leaf(rand(3, 5, 64, scale=2.0)), leaf(rand(3, 5, 64)), rand(3, 5, 64).to(BF16)

    def run():
        with torch.autocast(DEVICE, dtype=BF16):
            y, s = norm(x, r)
        assert y.dtype == BF16 and s.dtype == F32
        return (y, s, *torch.autograd.grad((y.float() * gy.float()).sum() + s.sum(), (x, r, norm.weight)))

    dispatch.reset_backends()
    expected = run()
    monkeypatch.setenv("NANOVISION_KERNEL_BACKEND", backend)
    dispatch.reset_backends()
    try:
        actual = run()
        assert K.kernel_backends()["rms_norm"] == backend  # a failed compile would have switched to eager
    finally:
        monkeypatch.delenv("NANOVISION_KERNEL_BACKEND")
        dispatch.reset_backends()
    for name, a, e in zip(("y", "s", "dx", "dr", "dw"), actual, expected):
        assert_close(a, e, F32, name, REBUILT_TOL[BF16])


@pytest.mark.skipif(TEST_ON_CUDA, reason="CPU tensors without the interpreter")
def test_act_linear_falls_back_per_call_without_interpreter(monkeypatch):
    # triton chosen for the process, but CPU tensors and no interpreter: the call must take the fallback backend
    dispatch.reset_backends()
    try:
        assert K.kernel_backends()["swiglu"] == "triton"
        monkeypatch.setattr(dispatch, "_interpret", lambda: False)
        monkeypatch.setattr(dispatch, "_FALLBACK", "eager")  # not torch_compile: no inductor build on a test CPU
        monkeypatch.setattr(swiglu_ops, "_act_linear_op", None)  # the Triton path would fail loudly
        g, u, w, b = rand(3, 32), rand(3, 32), rand(8, 32), rand(8)
        torch.testing.assert_close(K.swiglu_linear(g, u, w, b), swiglu_linear_reference(g, u, w, b))
        torch.testing.assert_close(K.relu2_linear(u, w, b), relu2_linear_reference(u, w, b))
    finally:
        monkeypatch.undo()  # reset_backends chooses again at once: with the real interpreter flag
        dispatch.reset_backends()


def test_public_names_shadow_no_submodule():
    """`nanovision.kernels.<name>` is what __all__ says it is, never a function hiding a module file of that name."""
    import importlib.util

    for name in K.__all__:
        assert importlib.util.find_spec(f"nanovision.kernels.{name}") is None, name
    assert K.rms_norm.__module__ == "nanovision.kernels.dispatch"
    assert K.rms_norm is getattr(dispatch, K.rms_norm.__qualname__)  # pickled by name, it stays the dispatching one
    x = rand(3, 64)
    torch.testing.assert_close(K.rms_norm(x=x, eps=1e-5), rms_norm_reference(x, eps=1e-5))
