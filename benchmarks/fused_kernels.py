"""Benchmark nanovision's fused kernels against eager / torch.compile / torch / Liger.

    python benchmarks/fused_kernels.py                      # H100 shapes (needs CUDA)
    python benchmarks/fused_kernels.py --smoke              # tiny shapes, CPU ok (Triton interpreter)
    python benchmarks/fused_kernels.py --ops rms_norm swiglu --out results.json

The fused FLCE computes its gradients inside the forward when inputs require grad,
so its "fwd" row already includes most of the backward work.

Bandwidth = bytes the op must move at least once (each input read once, each
output written once) / median time. A device-to-device copy in the same run
gives the ceiling. FLCE reports time, TFLOP/s and peak extra memory (above the
inputs) of forward+backward versus the unfused path (logits = h @ W.T, then
cross-entropy on fp32 logits, as HF models do).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

_SMOKE = "--smoke" in sys.argv
if _SMOKE and os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanovision.configuration_nanovision import FUSED_KERNEL_OPS  # noqa: E402
from nanovision.kernels.ops.linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from nanovision.kernels.ops.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from nanovision.kernels.ops.rope import apply_rotary, apply_rotary_reference  # noqa: E402
from nanovision.kernels.ops.swiglu import relu2, relu2_reference, swiglu, swiglu_reference  # noqa: E402


# --------------------------------------------------------------------------- #
# optional Liger-Kernel (comparison only)
# --------------------------------------------------------------------------- #
def _liger():
    ops = {}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        ops["rms_norm"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
    except Exception:
        pass
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        ops["swiglu"] = LigerSiLUMulFunction.apply
    except Exception:
        pass
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        ops["rope"] = LigerRopeFunction.apply
    except Exception:
        pass
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def liger_linear_cross_entropy(hidden, weight, labels):
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels)
            return out[0] if isinstance(out, tuple) else out  # 0.8.x returns (loss, z_loss, ...)

        ops["linear_cross_entropy"] = liger_linear_cross_entropy
    except Exception:
        pass
    return ops


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #
class Bench:
    """Median time per call. On CUDA the calls are replayed from a CUDA graph by default, so
    the numbers are device time without Python/launch overhead (which would otherwise
    dominate ~50 us kernels); --no-cudagraph times plain calls with L2 flushes instead."""

    def __init__(self, device, warmup_ms, rep_ms, cudagraph=True):
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cudagraph = cudagraph

    def time_ms(self, fn):
        if self.device.type == "cuda":
            import triton.testing

            fn()  # compile / autotune outside any capture
            torch.cuda.synchronize()
            if self.cudagraph:
                try:
                    return float(triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median"))
                except Exception as e:  # not capturable -> plain timing
                    print(f"  (cuda graph capture failed: {type(e).__name__}; timing plain calls)")
                    torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_extra_mb(self, fn):
        if self.device.type != "cuda":
            return None
        fn()  # warm (compile, allocator)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _fwd_bwd(fn, inputs, grads_out):
    def run():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, grads_out)

    return run


def _maybe_compile(fn, enabled):
    return torch.compile(fn) if enabled else None


# --------------------------------------------------------------------------- #
# benchmarks
# --------------------------------------------------------------------------- #
def bench_copy(b, n_bytes, tag=""):
    """Device-to-device copy ceiling. Inside a CUDA graph copy_ becomes a copy-engine memcpy
    node (slower than an SM kernel), so also time it as plain calls and as an SM kernel."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=b.device).uniform_()
    y = torch.empty_like(x)
    nb = 2 * _nbytes(x)
    rows = []
    graph = b.cudagraph
    b.cudagraph = False
    t = b.time_ms(lambda: y.copy_(x))
    b.cudagraph = graph
    rows.append({"op": "copy", "pass": "fwd", "variant": "copy_ (plain calls)" + tag, "ms": t, "GB/s": nb / t / 1e6})
    t = b.time_ms(lambda: torch.mul(x, 1.0, out=y))
    rows.append({"op": "copy", "pass": "fwd", "variant": "x*1 kernel" + tag, "ms": t, "GB/s": nb / t / 1e6})
    return rows


def _rows(op, shape, dtype, variants, fwd_bytes, fb_bytes, b, make_fwd, inputs, grads):
    rows = []
    for name, fn in variants.items():
        try:
            f = make_fwd(fn)
            t_f = b.time_ms(f)
            t_fb = b.time_ms(_fwd_bwd(f, inputs, grads))
        except Exception as e:  # a comparison that fails must not sink the run
            rows.append({"op": op, "shape": shape, "dtype": str(dtype), "variant": name, "error": repr(e)[:200]})
            continue
        for p, t, nb in (("fwd", t_f, fwd_bytes), ("fwd+bwd", t_fb, fb_bytes)):
            rows.append({"op": op, "shape": shape, "dtype": str(dtype), "pass": p, "variant": name,
                         "ms": t, "GB/s": nb / t / 1e6})
    return rows


def bench_rms_norm(b, M, N, dtype, compile_ok, liger):
    dev = b.device
    x = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device=dev, dtype=dtype)).requires_grad_(True)
    r = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    eps = 1e-6
    rows = []
    variants = {
        "nanovision": lambda: rms_norm(x, w, eps),
        "eager": lambda: rms_norm_reference(x, w, eps),
        "F.rms_norm": lambda: F.rms_norm(x, (N,), w, eps),
    }
    if compile_ok:
        c = torch.compile(rms_norm_reference)
        variants["torch.compile"] = lambda: c(x, w, eps)
    if "rms_norm" in liger:
        variants["liger"] = lambda: liger["rms_norm"](x, w, eps)
    xb = _nbytes(x)
    rows += _rows("rms_norm", [M, N], dtype, variants, 2 * xb, 5 * xb, b, lambda f: f, (x, w), (dy,))

    # residual-fused variant: reads x, r; writes y, s (backward: reads s, dy, ds; writes dx)
    ds = torch.randn(M, N, device=dev, dtype=dtype)
    variants = {
        "nanovision": lambda: rms_norm(x, w, eps, r),
        "eager": lambda: rms_norm_reference(x, w, eps, r),
    }
    if compile_ok:
        c2 = torch.compile(rms_norm_reference)
        variants["torch.compile"] = lambda: c2(x, w, eps, r)
    rows += _rows("rms_norm+residual", [M, N], dtype, variants, 4 * xb, 8 * xb, b, lambda f: f, (x, w, r), (dy, ds))
    return rows


def bench_swiglu(b, M, N, dtype, compile_ok, liger):
    dev = b.device
    g = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
    u = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    nb = _nbytes(g)
    variants = {"nanovision": lambda: swiglu(g, u), "eager": lambda: swiglu_reference(g, u)}
    if compile_ok:
        c = torch.compile(swiglu_reference)
        variants["torch.compile"] = lambda: c(g, u)
    if "swiglu" in liger:
        variants["liger"] = lambda: liger["swiglu"](g, u)
    rows = _rows("swiglu", [M, N], dtype, variants, 3 * nb, 8 * nb, b, lambda f: f, (g, u), (dy,))

    variants = {"nanovision": lambda: relu2(g), "eager": lambda: relu2_reference(g)}
    if compile_ok:
        c2 = torch.compile(relu2_reference)
        variants["torch.compile"] = lambda: c2(g)
    rows += _rows("relu2", [M, N], dtype, variants, 2 * nb, 5 * nb, b, lambda f: f, (g,), (dy,))
    return rows


def bench_rope(b, B, T, Hq, Hk, D, dtype, compile_ok, liger):
    dev = b.device
    # the attention module's layout: projections viewed as [B, T, H, D] and transposed
    q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, Hk, D, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    freqs = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    nb = 2 * _nbytes(q, k) + _nbytes(cos, sin)
    variants = {"nanovision": lambda: apply_rotary(q, k, cos, sin),
                "eager": lambda: apply_rotary_reference(q, k, cos, sin)}
    if compile_ok:
        c = torch.compile(apply_rotary_reference)
        variants["torch.compile"] = lambda: c(q, k, cos, sin)
    if "rope" in liger:
        variants["liger"] = lambda: liger["rope"](q, k, cos, sin)
    shape = {"q": [B, Hq, T, D], "k": [B, Hk, T, D]}
    return _rows("rope", shape, dtype, variants, nb, 2 * nb, b, lambda f: f, (q, k), (dq, dk))


def bench_flce(b, N, H, V, dtype, compile_ok, liger, chunk_sizes=(None,)):
    dev = b.device
    h = (torch.randn(N, H, device=dev, dtype=dtype) * 0.5).requires_grad_(True)
    w = (torch.randn(V, H, device=dev, dtype=dtype) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=dev)
    labels[torch.rand(N, device=dev) < 0.1] = -100
    flops_fb = 6.0 * N * H * V  # logits, grad_hidden, grad_weight matmuls
    variants = {}
    for cs in chunk_sizes:
        name = "nanovision" if cs is None else f"nanovision(chunk={cs})"
        variants[name] = (lambda cs=cs: fused_linear_cross_entropy(h, w, labels, chunk_size=cs))
    variants["unfused eager"] = lambda: linear_cross_entropy_reference(h, w, labels)  # fp32 logits (HF)
    variants["unfused eager bf16 CE"] = lambda: F.cross_entropy(h @ w.t(), labels)
    if compile_ok:
        c = torch.compile(linear_cross_entropy_reference)
        variants["unfused torch.compile"] = lambda: c(h, w, labels)
    if "linear_cross_entropy" in liger:
        variants["liger"] = lambda: liger["linear_cross_entropy"](h, w, labels)
    rows = []
    for name, f in variants.items():
        try:
            fb = _fwd_bwd(f, (h, w), None)
            t_f = b.time_ms(f)
            t_fb = b.time_ms(fb)
            peak = b.peak_extra_mb(fb)
        except Exception as e:
            rows.append({"op": "linear_cross_entropy", "variant": name, "error": repr(e)[:200]})
            continue
        rows.append({"op": "linear_cross_entropy", "shape": [N, H, V], "dtype": str(dtype), "pass": "fwd",
                     "variant": name, "ms": t_f, "TFLOP/s": flops_fb / 3 / t_f / 1e9})
        rows.append({"op": "linear_cross_entropy", "shape": [N, H, V], "dtype": str(dtype), "pass": "fwd+bwd",
                     "variant": name, "ms": t_fb, "TFLOP/s": flops_fb / t_fb / 1e9, "peak_extra_MiB": peak})
    base = next((r.get("peak_extra_MiB") for r in rows
                 if r.get("variant") == "unfused eager" and r.get("pass") == "fwd+bwd"), None)
    if base:
        for r in rows:
            if r.get("peak_extra_MiB") is not None:
                r["peak_vs_unfused_eager"] = r["peak_extra_MiB"] / base
    return rows


# --------------------------------------------------------------------------- #
def _print_table(rows, copy_gbs):
    hdr = (f"{'op':<20} {'pass':<8} {'variant':<30} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
           f"{'TFLOP/s':>8} {'peakMiB':>9} {'vs unf':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<20} {'':<8} {r['variant']:<30} ERROR {r['error']}")
            continue
        gbs = r.get("GB/s")
        tfl = r.get("TFLOP/s")
        peak = r.get("peak_extra_MiB")
        rel = r.get("peak_vs_unfused_eager")
        cols = [
            f"{gbs:8.0f}" if gbs else " " * 8,
            f"{100 * gbs / copy_gbs:5.0f}%" if gbs and copy_gbs else " " * 6,
            f"{tfl:8.1f}" if tfl else " " * 8,
            f"{peak:9.0f}" if peak is not None else " " * 9,
            f"{100 * rel:6.1f}%" if rel is not None else " " * 7,
        ]
        print(f"{r['op']:<20} {r.get('pass', ''):<8} {r['variant']:<30} {r['ms']:9.3f} " + " ".join(cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU via the Triton interpreter)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels.json"))
    ap.add_argument("--ops", nargs="+", default=list(FUSED_KERNEL_OPS), choices=FUSED_KERNEL_OPS)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile'd references")
    ap.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even if installed")
    ap.add_argument("--no-cudagraph", action="store_true", help="time plain calls instead of graph replays")
    ap.add_argument("--warmup-ms", type=float, default=50.0)
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--flce-chunks", type=int, nargs="*", default=[],
                    help="extra FLCE chunk sizes to time besides the default")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device: run with --smoke for a CPU sanity check")
    device = torch.device("cuda" if cuda else "cpu")
    b = Bench(device, args.warmup_ms, args.rep_ms, cudagraph=not args.no_cudagraph)
    compile_ok = not args.no_compile and cuda  # inductor on CPU is slow to compile; skip in CPU smoke runs
    liger = {} if args.no_liger else _liger()
    bf16 = torch.bfloat16

    if args.smoke:
        shapes = dict(rms=(64, 100), swiglu=(64, 320), rope=(2, 16, 4, 2, 64), flce=(64, 64, 300), copy=1 << 20)
    else:
        shapes = dict(rms=(16384, 2048), swiglu=(16384, 5632), rope=(8, 2048, 10, 5, 128),
                      flce=(16384, 1280, 50304), copy=1 << 31)

    # warm the GPU (clocks) before the copy ceiling; measure the copy again at the end
    warm = torch.randn(1 << 24, device=device)
    for _ in range(50 if cuda else 1):
        warm = warm * 1.0001
    rows = bench_copy(b, shapes["copy"])
    if "rms_norm" in args.ops:
        rows += bench_rms_norm(b, *shapes["rms"], bf16, compile_ok, liger)
    if "swiglu" in args.ops:
        rows += bench_swiglu(b, *shapes["swiglu"], bf16, compile_ok, liger)
    if "rope" in args.ops:
        rows += bench_rope(b, *shapes["rope"], bf16, compile_ok, liger)
    if "linear_cross_entropy" in args.ops:
        rows += bench_flce(b, *shapes["flce"], bf16, compile_ok, liger,
                           chunk_sizes=[None] + list(args.flce_chunks))

    rows[2:2] = bench_copy(b, shapes["copy"], tag=", end of run")
    copy_gbs = max(r["GB/s"] for r in rows if r["op"] == "copy")
    meta = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "smoke": args.smoke,
        "liger": sorted(liger),
        "copy_GB/s": copy_gbs,
        "timing": "median; " + ("cuda graph replay" if cuda and not args.no_cudagraph else "plain calls"),
        "bytes": "each input read once + each output written once (fwd+bwd: both passes)",
    }
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy ceiling {copy_gbs:.0f} GB/s  liger: {meta['liger'] or 'not installed'}")
    _print_table(rows, copy_gbs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
